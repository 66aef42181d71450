"""Would refitting the teacher on train + valid lists help? Measured on validation only.

A refit on every validation list leaves nothing to validate it on, so this measures it on
halves of the validation users (issue 15, idea "refit on train + valid after selection"):
half A is held out, half B's validation lists (features read the training items, labels are
their validation items: the lists closest to the test view) join the training lists. The
teacher is trained twice with the pipeline's teacher config and seed: on the training lists
alone, and on them plus B's lists; both are evaluated after every epoch on A. The refit rule
would train for the epoch count chosen on validation, so the table gives every epoch and
the paired difference at the epoch the baseline chooses on A (``--held B``: the halves swap).

Reads the candidates step of ``slimrank pipeline --config CONFIG`` from the step cache::

    .venv/bin/python bench/refit_valid.py [--config pipeline]

Writes ``bench/results/refit_valid.md`` (``refit_valid_B.md`` with ``--held B``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimrank.evaluation.paired import paired_bootstrap  # noqa: E402
from slimrank.pipeline.artifacts import CandidatesArtifact, DataArtifact  # noqa: E402
from slimrank.pipeline.config import load_config, resolve_config  # noqa: E402
from slimrank.pipeline.run import cached_step_paths  # noqa: E402
from slimrank.pipeline.steps import teacher_model_config  # noqa: E402
from slimrank.ranking.features import CandidateFeatures  # noqa: E402
from slimrank.ranking.pipeline_eval import pipeline_per_user  # noqa: E402
from slimrank.ranking.teacher import teacher_scores  # noqa: E402
from slimrank.ranking.train import train_teacher  # noqa: E402

RESULTS = HERE / "results"


def concat(a: CandidateFeatures, b: CandidateFeatures) -> CandidateFeatures:
    return CandidateFeatures(
        np.concatenate([a.values, b.values]),
        a.names,
        np.concatenate([a.user, b.user]),
        np.concatenate([a.items, b.items]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--candidates", type=Path, help="a candidates step directory instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the halves")
    parser.add_argument("--held", choices=("A", "B", "both"), default="A", help="half held out")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run")
    args = parser.parse_args()
    config = load_config(resolve_config(args.config))
    paths = cached_step_paths(config)
    cand_dir = args.candidates or paths["candidates"]
    if not (cand_dir / "valid.safetensors").exists():
        print(f"{cand_dir}: no candidates step; run slimrank pipeline --config {args.config}")
        return 1
    data = DataArtifact.load(paths["data"])
    views = CandidatesArtifact.load(cand_dir).views
    _, feats, labels = views["train"]
    v_cands, v_feats, v_labels = views["valid"]
    truth = data.truth("valid")
    k = config.k
    tc = config.teacher
    model_config = teacher_model_config(tc, feats.values.shape[-1], data)
    # Train every epoch (no early stop) so both runs have each epoch's model evaluated.
    train = dataclasses.replace(
        tc.train, metric=f"ndcg@{k}", epochs=args.epochs, patience=args.epochs
    )
    rng = np.random.default_rng(args.seed)
    half = rng.permutation(len(v_cands.user)) < len(v_cands.user) // 2
    lines = [
        "# Refit on train + valid lists, measured on held-out validation halves (ml-100k)",
        "",
        f"Teacher: `[teacher]` of `{args.config}`, {train.epochs} epochs, no early stop. "
        f"Halves of the {len(v_cands.user)} validation users, seed {args.seed}.",
        "",
        "| held out | lists added | epoch | NDCG@10 train lists only | NDCG@10 plus the other "
        "half's valid lists | paired difference [95% CI] |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for swap in {"A": [0], "B": [1], "both": [0, 1]}[args.held]:
        held = half if swap == 0 else ~half
        a_cands, a_feats = v_cands.take(held), v_feats.take(held)
        per_epoch: dict[str, list] = {}
        for name, (x, y) in {
            "base": (feats, labels),
            "refit": (
                concat(feats, v_feats.take(~held)),
                np.concatenate([labels, v_labels[~held]]),
            ),
        }.items():
            runs: list = []

            def validate(model, runs=runs, a_cands=a_cands, a_feats=a_feats):
                runs.append(pipeline_per_user(a_cands, teacher_scores(model, a_feats), truth, k))
                return {f"ndcg@{k}": runs[-1].mean}

            train_teacher(model_config, x, y, validate, train, progress=False)
            per_epoch[name] = runs
            print(name, [round(r.mean, 4) for r in runs], flush=True)
        base, refit = per_epoch["base"], per_epoch["refit"]
        chosen = int(np.argmax([r.mean for r in base]))
        for epoch in range(1, len(base)):
            ci = paired_bootstrap(refit[epoch], base[epoch], resamples=2000)
            mark = " (chosen)" if epoch == chosen else ""
            lines.append(
                f"| {'A' if swap == 0 else 'B'} ({int(held.sum())} users) | {int((~held).sum())} "
                f"| {epoch}{mark} | {base[epoch].mean:.4f} | {refit[epoch].mean:.4f} "
                f"| {ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] |"
            )
    lines += [
        "",
        f"Command: `.venv/bin/python bench/refit_valid.py --config {args.config} "
        f"--held {args.held}`",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"refit_valid{'' if args.held == 'A' else '_' + args.held}.md").write_text(
        "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
