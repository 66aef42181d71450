#!/bin/sh
# One retrain run, as the compose loop and the Kubernetes CronJob start it: re-distill,
# re-prune and re-quantize the ranker from the served bundle's teacher on the interaction logs
# that arrived since the last run, and publish the result (CURRENT moves; the servers follow
# it). The logs file is claimed before the run, so a shipper can drop the next one meanwhile,
# and filed under RETRAIN_DONE afterwards, so no run appends the same logs twice; a failed
# run's logs are kept there with a .failed suffix for an operator to look at.
#
# Environment:
#   SLIMRANK_BUNDLES  the bundle store (versions and CURRENT)
#   RETRAIN_LOGS      the new logs file (CSV or Parquet) a log shipper drops
#   RETRAIN_DONE      where consumed logs are filed
set -eu

bundles=${SLIMRANK_BUNDLES:?SLIMRANK_BUNDLES must name the bundle store}
logs=${RETRAIN_LOGS:?RETRAIN_LOGS must name the new logs file}
done_dir=${RETRAIN_DONE:?RETRAIN_DONE must name a directory for consumed logs}

if [ ! -f "$logs" ]; then
    echo "retrain: no new logs at $logs; nothing to do"
    exit 0
fi
teacher=$(cat "$bundles/CURRENT")
mkdir -p "$done_dir"
claimed="$done_dir/$(date -u +%Y%m%dT%H%M%SZ)-$(basename "$logs")"
mv "$logs" "$claimed"
echo "retrain: from $teacher on $claimed"
if ! slimrank retrain --teacher "$teacher" --logs "$claimed" --bundles "$bundles"; then
    mv "$claimed" "$claimed.failed"
    echo "retrain: failed; logs kept at $claimed.failed, still serving $teacher" >&2
    exit 1
fi
