"""``slimrank pipeline`` and ``slimrank retrain``: the offline flow, ending in a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from slimrank.bundle.root import ROOT_HELP, bundles_root

if TYPE_CHECKING:
    from rich.console import Console

    from slimrank.pipeline.config import PipelineConfig
    from slimrank.pipeline.engine import EngineConfig
    from slimrank.pipeline.run import RunResult

EXIT_GATE_FAILED = 3


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pipeline``, ``retrain`` and ``compress`` commands."""
    from slimrank.pipeline import compress_cli

    parser = sub.add_parser(
        "pipeline",
        help="run every offline step and publish a bundle if the ranker passes the gate",
        description="Data, two-tower, FAISS index, candidates, teacher, students, pruning, "
        "int8 and the accuracy gate (each step cached, so an interrupted run resumes), then "
        "an atomic bundle publish. A ranker that fails the gate is not published and the "
        f"command exits {EXIT_GATE_FAILED}.",
    )
    parser.add_argument(
        "--config",
        default="pipeline",
        help="pipeline TOML file, or a shipped config's name: pipeline (default), scale, tiny",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="only load and check the config, print which file it is, and exit",
    )
    _common(parser)
    parser.set_defaults(func=_pipeline)

    retrain = sub.add_parser(
        "retrain",
        help="re-distill, re-prune and re-quantize the ranker from a bundle's teacher",
        description="Appends new logs to a bundle's training interactions, re-mines the "
        "candidates, re-distills and re-prunes the student from the bundle's teacher (or "
        "retrains the teacher), quantizes, gates and publishes with the parent teacher "
        "recorded.",
    )
    retrain.add_argument(
        "--teacher", required=True, help="bundle directory, or a version under --bundles"
    )
    retrain.add_argument("--logs", required=True, help="new interaction logs (CSV or Parquet)")
    retrain.add_argument(
        "--retrain-teacher", action="store_true", help="train a new teacher on the new data"
    )
    retrain.add_argument(
        "--config",
        help="pipeline TOML file or shipped config's name (default: the bundle's manifest's)",
    )
    _common(retrain)
    retrain.set_defaults(func=_retrain)
    compress_cli.register(sub)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundles", type=Path, help=ROOT_HELP)
    parser.add_argument("--cache-dir", help="step cache directory (default: from the config)")
    parser.add_argument("--out", default="runs/pipeline", help="directory for the report files")
    parser.add_argument(
        "--min-ratio", type=float, help="override the gate's minimum int8/teacher NDCG ratio"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="run candidate mining, teacher scoring and student training here or on Ray "
        "(needs the ray extra)",
    )
    parser.add_argument(
        "--ray-address", default="", help="Ray cluster to join (default: start a local one)"
    )
    parser.add_argument(
        "--ray-workers",
        type=int,
        default=1,
        help="Ray Train workers for student distillation (1: the local training loop)",
    )
    parser.add_argument(
        "--ray-batch-users",
        type=int,
        default=256,
        help="users per Ray Data batch in candidate mining and teacher scoring",
    )


def _engine(args: argparse.Namespace) -> EngineConfig:
    from slimrank.errors import SlimrankError
    from slimrank.pipeline.engine import EngineConfig

    try:
        return EngineConfig(
            kind=args.engine,
            address=args.ray_address,
            workers=args.ray_workers,
            batch_users=args.ray_batch_users,
        )
    except ValueError as err:
        raise SlimrankError(str(err)) from err


def _configure(config: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    import dataclasses

    from slimrank.config import FieldError
    from slimrank.errors import SlimrankError

    if args.cache_dir:
        config = dataclasses.replace(config, cache_dir=args.cache_dir)
    if args.min_ratio is not None:
        try:
            gate = dataclasses.replace(config.int8.gate, min_ratio=args.min_ratio)
        except FieldError as err:
            raise SlimrankError(f"--min-ratio {args.min_ratio}: {err.why}") from None
        config = dataclasses.replace(config, int8=dataclasses.replace(config.int8, gate=gate))
    return config


def _finish(result: RunResult, args: argparse.Namespace, console: Console, title: str) -> int:
    """Report, publish if the gate passed, print the closing summary; return the exit code."""
    import json
    from pathlib import Path

    from slimrank.pipeline.console import print_report
    from slimrank.pipeline.publish import publish_run
    from slimrank.pipeline.report import build_report, plot_report, render_markdown

    with console.status("measuring latency ..."):
        report = build_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.md").write_text(render_markdown(report))
    (out / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_report(report, out / "compression.png")
    print_report(report, console, title)
    gate = result.gate()
    bundles = bundles_root(args.bundles)
    version = publish_run(result, bundles, report.to_dict())
    console.print(f"teacher version: {result.teacher_version}")
    if version is None:
        attempts = {mode: d["ratio"] for mode, d in gate["decisions"].items()}
        console.print(
            f"[red]gate failed[/]: no int8 ranker kept validation NDCG@{result.config.k} "
            f">= {gate['min_ratio']} x the teacher's {gate['teacher_valid']:.4f} "
            f"(best ratio per mode, every fallback tried: "
            + ", ".join(f"{m} {r:.3f}" for m, r in attempts.items())
            + "); nothing published"
        )
        return EXIT_GATE_FAILED
    console.print(
        f"[green]published[/] {version} to {bundles} (current); int8 mode {gate['mode']}, "
        f"report in {out}"
    )
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimrank.pipeline.config import load_config, resolve_config
    from slimrank.pipeline.console import hook_for
    from slimrank.pipeline.run import run_pipeline

    console = Console()
    config = _configure(load_config(args.config), args)
    if args.check_config:
        console.print(f"config {resolve_config(args.config)}: ok", highlight=False)
        return 0
    hook = hook_for(console)
    try:
        result = run_pipeline(config, hook, engine=_engine(args))
    finally:
        hook.close()
    return _finish(result, args, console, "Pipeline")


def _retrain(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimrank.pipeline.cache import StepCache
    from slimrank.pipeline.config import load_config
    from slimrank.pipeline.console import hook_for
    from slimrank.pipeline.retrain import bundle_config, find_bundle, import_bundle
    from slimrank.pipeline.run import run_pipeline

    console = Console()
    bundle = find_bundle(args.teacher, bundles_root(args.bundles))
    config = load_config(args.config) if args.config else bundle_config(bundle)
    config = _configure(config, args)
    provided, teacher, counts = import_bundle(bundle, args.logs, StepCache(config.cache_dir))
    console.print(
        f"retraining from {bundle.version} (teacher {teacher.version}): "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
    )
    hook = hook_for(console)
    try:
        result = run_pipeline(
            config,
            hook,
            provided,
            None if args.retrain_teacher else teacher,
            engine=_engine(args),
        )
    finally:
        hook.close()
    return _finish(result, args, console, "Retrain")
