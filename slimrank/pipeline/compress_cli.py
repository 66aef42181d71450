"""``slimrank compress``: run the pipeline's steps and print the compression table (its rows
and their measurement live in :mod:`slimrank.pipeline.report`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compress`` command."""
    parser = sub.add_parser(
        "compress",
        help="train, distill, prune and quantize rankers; print the compression table",
        description="Runs the pipeline steps (cached, so an interrupted run resumes) and "
        "writes one table of every ranker variant: test NDCG/Recall, size and single-thread "
        "latency measured side by side, as Markdown, JSON and a PNG plot.",
    )
    parser.add_argument(
        "--config",
        default="pipeline",
        help="pipeline TOML file, or a shipped config's name: pipeline (default), scale, tiny",
    )
    parser.add_argument("--out", default="runs/compress", help="directory for the report files")
    parser.add_argument("--cache-dir", help="step cache directory (default: from the config)")
    parser.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from rich.console import Console

    from slimrank.pipeline.config import load_config
    from slimrank.pipeline.console import hook_for, print_report
    from slimrank.pipeline.report import build_report, plot_report, render_markdown
    from slimrank.pipeline.run import run_pipeline

    console = Console()
    config = load_config(args.config)
    if args.cache_dir:
        config = dataclasses.replace(config, cache_dir=args.cache_dir)
    hook = hook_for(console)
    try:
        result = run_pipeline(config, hook)
    finally:
        hook.close()
    with console.status(f"measuring latency ({config.latency.repeats} rounds) ..."):
        report = build_report(result)
    print_report(report, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"slimrank compress --config {args.config}"
    (out / "compression.md").write_text(render_markdown(report, command))
    (out / "compression.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_report(report, out / "compression.png")
    console.print(f"wrote {out / 'compression.md'}, compression.json and compression.png")
    return 0
