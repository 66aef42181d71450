"""Teacher settings tried on validation: the pipeline's teacher with ``[teacher]`` overrides.

Issue 15 needs a stronger teacher. The teacher's shape and training settings in
``configs/pipeline.toml`` were set by hand; this trains the teacher again (same training
lists, seed and early stop on validation NDCG@10, ``train_pipeline_teacher``) with each
variant's overrides and compares it with the cached teacher on the validation view, paired
over users. Nothing here reads the test view.

    .venv/bin/python bench/teacher_search.py --variant '{"base_feature": "ease_score"}' \\
        --variant '{"train.lr": 0.001}' [--config pipeline] [--out teacher_search]

A variant is a JSON object of dotted ``[teacher]`` overrides (``"deep": [2048, 1024, 256]``,
``"train.weight_decay": 0.001``); every variant starts from the config's own section. Reads
the cached steps of ``slimrank pipeline --config CONFIG`` (after ``make demo``); about 3.5
minutes per variant. Writes ``bench/results/<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # cached_teacher.py

from cached_teacher import (  # noqa: E402
    TeacherRun,
    drop_columns,
    load_cached_teacher,
    table_row,
    train_against_cached,
)

from bench.scale_steps import set_dotted  # noqa: E402

RESULTS = HERE / "results"


def variant(text: str) -> dict[str, Any]:
    """One ``--variant``: a JSON object of dotted ``[teacher]`` overrides."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: want a JSON object of overrides")
    return value


def check_variants(
    section: dict[str, Any], variants: list[dict[str, Any]]
) -> tuple[list[Any], str | None]:
    """Each variant's ``TeacherStepConfig``, or the first bad one's message (naming it)."""
    from slimrank.config import ConfigError
    from slimrank.pipeline.config import TeacherStepConfig

    configs = []
    for overrides in variants:
        try:
            raw = set_dotted(section, overrides, "--variant")
            configs.append(TeacherStepConfig.from_dict(raw))
        except SystemExit as error:  # set_dotted: a path the config does not hold
            return [], f"{error} (in {json.dumps(overrides)})"
        except ConfigError as error:
            return [], f"--variant {json.dumps(overrides)}: teacher.{error}"
    return configs, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--variant", type=variant, action="append", required=True)
    parser.add_argument(
        "--drop",
        nargs="+",
        default=[],
        help="leave out, for every variant, the columns whose name starts with these "
        "(e.g. user_vec_ item_vec_: the teacher without the raw embeddings)",
    )
    parser.add_argument("--out", default="teacher_search")
    args = parser.parse_args()
    from slimrank.config import ConfigError
    from slimrank.pipeline.config import load_config, resolve_config
    from slimrank.pipeline.steps import teacher_model_config

    try:
        section = load_config(resolve_config(args.config)).teacher.to_dict()
    except (ConfigError, OSError) as error:
        parser.error(f"--config {args.config}: {error}")
    configs, bad = check_variants(section, args.variant)
    if bad is not None:  # before the cache is read and the first variant trains
        parser.error(bad)
    cached = load_cached_teacher(args.config)
    if cached is None:
        return 1
    k, base = cached.k, cached.base
    feats, v_feats = cached.feats, cached.v_feats
    dropped = ""
    if args.drop:
        unmatched = [p for p in args.drop if not any(n.startswith(p) for n in feats.names)]
        if unmatched:
            parser.error(f"--drop: no column starts with {', '.join(unmatched)}")
        feats, v_feats = drop_columns(feats, args.drop), drop_columns(v_feats, args.drop)
        dropped = f"left out {len(cached.feats.names) - len(feats.names)} of "
        dropped += f"{len(cached.feats.names)} columns"
        print(dropped, flush=True)
    for overrides, teacher in zip(args.variant, configs, strict=True):
        try:  # a base_feature the (kept) columns lack, before anything trains
            teacher_model_config(teacher, len(feats.names), cached.data, tuple(feats.names))
        except ConfigError as error:
            parser.error(f"--variant {json.dumps(overrides)}: {error}")
    print(f"cached teacher: valid NDCG@{k} {base.mean:.4f}", flush=True)
    rows = []
    for overrides, teacher in zip(args.variant, configs, strict=True):
        run = train_against_cached(cached, teacher, feats, v_feats)
        rows.append((json.dumps(overrides), run))
        print(
            f"{overrides}: epoch {run.best_epoch}, valid {run.per.mean:.4f}, {run.ci}", flush=True
        )
        # Written after each variant: a run cut short keeps the rows it finished.
        write_results(args, rows, base, k, dropped)
    print(f"wrote bench/results/{args.out}.md")
    return 0


def write_results(
    args: argparse.Namespace, rows: list[tuple[str, TeacherRun]], base: Any, k: int, dropped: str
) -> None:
    """The results table of the variants trained so far."""
    command = "bench/teacher_search.py " + " ".join(f"--variant '{r[0]}'" for r in rows)
    command += f" --drop {' '.join(args.drop)}" if args.drop else ""
    lines = [
        "# Teacher settings on validation (issue 15)",
        "",
        f"`{command}` (config `{args.config}`{'; ' + dropped if dropped else ''}). The "
        "pipeline's teacher with each row's `[teacher]` "
        f"overrides, its training lists and seed, early stop on validation NDCG@{k}; pipeline "
        f"NDCG@{k} on the validation view ({len(base.values)} users), the interval the row "
        "minus the cached teacher, paired over users. Nothing reads test.",
        "",
        f"| overrides | chosen epoch | valid NDCG@{k} | minus cached teacher [95% CI] "
        "| valid NDCG by epoch (0 = untrained) | minutes |",
        "|---|---:|---:|---|---|---:|",
        f"| none (the cached teacher) | - | {base.mean:.4f} | - | - | - |",
    ]
    lines += [table_row(f"`{name}`", run) for name, run in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
