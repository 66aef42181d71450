"""Teacher variants on a scale run's cached candidates, against retrieval alone, on validation.

Why do the rankers add nothing over two-tower retrieval at 100k and 1M (issue 16)? This reads
one finished ``bench/scale_steps.py`` run's step cache (its data and candidates steps; nothing
is re-mined), trains the pipeline's teacher (``train_pipeline_teacher``: same lists, same
early stopping on the valid view) with the overrides given, and prints, per epoch, valid
NDCG@10, then the chosen epoch's valid NDCG@10 minus retrieval alone's (the candidates'
``retrieval_score`` order), paired over the valid view's users (95% bootstrap interval), and
the same on test, for the record only (choices are made on valid).

    nice -n 10 .venv/bin/python bench/scale_rankers.py bench/.cache/scale/cache-NAME \\
        --variant '{"train.epochs": 5}' --variant '{"base_feature": "retrieval_score"}'

A variant is a JSON object of ``[teacher]`` overrides (dotted, as in scale.toml); every variant
starts from the run's own ``[teacher]`` section.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.scale_checks import step_dir  # noqa: E402
from bench.scale_steps import set_dotted  # noqa: E402


def teacher_section(cache: Path) -> dict[str, Any]:
    """Return the ``[teacher]`` section the run's teacher step was keyed on, or scale.toml's
    when the run has no teacher step yet."""
    from slimrank.pipeline.config import load_config

    if not list(cache.glob("teacher-*")):
        return load_config("scale").teacher.to_dict()
    step = json.loads((step_dir(cache, "teacher") / "step.json").read_text())
    return step["config"]["teacher"]


def main() -> int:
    from slimrank.evaluation.paired import paired_bootstrap
    from slimrank.pipeline.artifacts import CandidatesArtifact, DataArtifact
    from slimrank.pipeline.config import TeacherStepConfig
    from slimrank.pipeline.steps import train_pipeline_teacher
    from slimrank.ranking.pipeline_eval import pipeline_per_user
    from slimrank.ranking.teacher import teacher_scores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the run's step cache (bench/.cache/scale/...)")
    parser.add_argument("--variant", action="append", default=[], help="JSON [teacher] overrides")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    data = DataArtifact.load(step_dir(args.cache, "data"))
    cand_dir = step_dir(args.cache, "candidates")
    _, feats, labels = CandidatesArtifact.load_one(cand_dir, "train")
    views = {v: CandidatesArtifact.load_one(cand_dir, v)[:2] for v in ("valid", "test")}
    base = {
        v: pipeline_per_user(c, c.retrieval_score, data.truth(v), args.k)
        for v, (c, _) in views.items()
    }
    print(f"retrieval alone: valid {base['valid'].mean:.4f}, test {base['test'].mean:.4f}")
    # Through the config class: fields added since the run take their defaults.
    section = TeacherStepConfig.from_dict(teacher_section(args.cache)).to_dict()
    rows = []
    for text in args.variant or ["{}"]:
        overrides = json.loads(text)
        config = TeacherStepConfig.from_dict(set_dotted(section, overrides, "--variant"))
        started, cpu = time.perf_counter(), time.process_time()
        result = train_pipeline_teacher(config, args.k, data, (feats, labels), views["valid"])
        row: dict[str, Any] = {"variant": overrides, "best_epoch": result.best_epoch}
        row["per_epoch_valid"] = [round(h[f"valid_ndcg@{args.k}"], 4) for h in result.history]
        for view, (cands, vfeats) in views.items():
            scores = teacher_scores(result.model, vfeats)
            per = pipeline_per_user(cands, scores, data.truth(view), args.k)
            ci = paired_bootstrap(per, base[view])
            row[view] = round(per.mean, 4)
            row[f"{view} minus retrieval"] = [round(x, 4) for x in (ci.diff, ci.low, ci.high)]
        row["cpu_s"] = round(time.process_time() - cpu, 0)
        row["wall_s"] = round(time.perf_counter() - started, 0)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
