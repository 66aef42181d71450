# slimrank: every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where `make demo` keeps its run (bundles, reports); data goes to $SLIMRANK_DATA or the user cache.
RUN_DIR ?= runs/demo

.PHONY: install system-deps test lint unit check-slim-install demo bench bench-scale bench-retrieval-ml100k bench-serving bench-serving-ml100k bench-serving-quick bench-features bench-online bench-http bench-reload protos check-protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev,ray,peers]'
	touch $(STAMP)

install: $(STAMP)

# Debian's prometheus and promtool, for the tests of deploy/prometheus, and nginx and
# HAProxy, for `slimrank front` and its tests (needs root; CI is root). Without them those
# tests skip, except under CI=true, where a missing promtool, nginx or haproxy fails.
system-deps:
	@scripts/install_prometheus.sh || { if [ -n "$$CI" ]; then exit 1; fi; \
	  echo "warning: prometheus/promtool not installed; their tests will skip" >&2; }
	@scripts/install_nginx.sh || { if [ -n "$$CI" ]; then exit 1; fi; \
	  echo "warning: nginx not installed; the rate front's tests will skip" >&2; }
	@scripts/install_haproxy.sh || { if [ -n "$$CI" ]; then exit 1; fi; \
	  echo "warning: haproxy not installed; the queue front's tests will skip" >&2; }

lint: install
	$(BIN)/ruff check slimrank tests bench deploy scripts
	$(BIN)/ruff format --check slimrank tests bench deploy scripts

unit: install system-deps
	$(BIN)/python -m pytest -q

test: lint check-protos unit

# The slim server install for real, in a temporary venv: pip install . (no extras), no torch or
# pandas installed, then serve and query $(RUN_DIR)/bundles (or a tiny bundle it builds) from it.
# It downloads the core dependencies, so make test does not run it.
check-slim-install: install
	$(PYTHON) scripts/check_slim_install.py --bundles $(RUN_DIR)/bundles \
		--build-tiny-with $(BIN)/slimrank --full-venv $(VENV)

# The pipeline exits 3 when the int8 ranker fails the accuracy gate: nothing is published, so
# make stops there, after the pipeline's message.
demo: install
	$(BIN)/slimrank data fetch movielens-100k
	$(BIN)/slimrank data info movielens-100k
	$(BIN)/slimrank baseline --dataset movielens-100k
	$(BIN)/slimrank pipeline --config pipeline --bundles $(RUN_DIR)/bundles --out $(RUN_DIR)/report
	$(BIN)/python scripts/demo_serve.py --bundles $(RUN_DIR)/bundles

bench: install bench-retrieval-ml100k bench-features
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/ranker_runtime.py
	$(BIN)/python bench/ease_truncation.py
	$(BIN)/python bench/online_path.py
	$(BIN)/python bench/serving.py --variants ml100k,fastfeat,teacher
	$(BIN)/python bench/serving_reload.py

# Per-request feature cost on synthetic 10k / 100k / 1M worlds (the tables' build takes minutes).
bench-features: install
	$(BIN)/python bench/features_scale.py

# Stage costs, the teacher behind the same features, served quality (needs make demo's bundle).
bench-online: install
	$(BIN)/python bench/online_path.py

# The index variants on the ml-100k two-tower's vectors (trained with the CLI defaults).
ML100K_TT := bench/.cache/ml100k_two_tower
bench-retrieval-ml100k: install
	$(BIN)/slimrank retrieval train --dataset movielens-100k --out $(ML100K_TT) --no-progress
	$(BIN)/slimrank retrieval evaluate --model $(ML100K_TT)
	$(BIN)/python bench/retrieval.py --name retrieval_ml100k \
		--embeddings $(ML100K_TT)/item_embeddings.npy \
		--query-embeddings $(ML100K_TT)/user_embeddings.npy

# configs/scale.toml end to end on a synthetic world (generate, every step, publish, load),
# with each step's wall and CPU time, peak RSS and output size: bench/results/scale_steps.md.
# The size is users x items x interactions per user; a small run, e.g.
#   make bench-scale SLIMRANK_SCALE_SIZE=2000x1000x15 SLIMRANK_SCALE_OVERRIDE='{"teacher.train.epochs": 1}'
# A run that is interrupted resumes from the step cache (bench/.cache/scale) when restarted.
SLIMRANK_SCALE_SIZE ?= 1000000x1000000x20
SLIMRANK_SCALE_OVERRIDE ?=
export SLIMRANK_SCALE_SIZE SLIMRANK_SCALE_OVERRIDE
bench-scale: install
	nice -n 10 $(BIN)/python bench/scale_steps.py

# Only the serving load test: its scale target serves the bundle make bench-scale publishes
# (it runs that pipeline first when the bundle is not cached; same SLIMRANK_SCALE_SIZE).
bench-serving: install
	$(BIN)/python bench/serving.py

bench-serving-quick: install
	$(BIN)/python bench/serving.py --quick

# Only the ml-100k server modes (needs make demo's bundle): bench/results/serving_modes.{json,md},
# each mode with the int8 student, a ~0.25 ms synthetic featurizer and the teacher bundle that
# bench-online publishes (the end-to-end speed-up of the student over the teacher).
bench-serving-ml100k: bench-online
	$(BIN)/python bench/serving.py --targets ml100k --variants ml100k,fastfeat,teacher \
		--loadgen-ceiling

# Start-up, RSS and two reloads under 100 calls/s through slimrank serve (needs make demo's
# bundle; BUNDLES=<root> for another, e.g. the one make bench-scale publishes).
BUNDLES ?= $(RUN_DIR)/bundles
bench-reload: install
	$(BIN)/python bench/serving_reload.py --bundles $(BUNDLES)

# The HTTP/JSON endpoint's stack: aiohttp vs asyncio + h11 (needs make demo's bundle).
bench-http: install
	$(BIN)/python bench/http_stack.py --bundles $(RUN_DIR)/bundles

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

# Generated stubs are committed; check-protos (CI) fails when they differ from the .proto files.
protos: install
	rm -rf slimrank/serving/proto
	PYTHON=$(BIN)/python scripts/gen_protos.sh slimrank/serving/proto

check-protos: install
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/gen_protos.sh $$tmp/proto && \
	diff -r -x __pycache__ $$tmp/proto slimrank/serving/proto; rc=$$?; rm -rf $$tmp; \
	if [ $$rc -ne 0 ]; then echo "stubs are stale: run make protos" >&2; fi; exit $$rc
