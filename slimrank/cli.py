"""The ``slimrank`` command: one entry point, subcommands registered by each subpackage.

Each ``slimrank/<area>/cli.py`` has ``register(subparsers)``, which adds its subcommands and
sets ``func`` on them; heavy imports (torch, faiss) happen inside the handlers so that
``slimrank --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from slimrank import __version__
from slimrank.errors import SlimrankError
from slimrank.extras import install_hint

# Areas whose cli module registers subcommands, in the order they appear in --help.
_AREAS = (
    "data",
    "evaluation",
    "retrieval",
    "ranking",
    "bundle",
    "pipeline",
    "serving",
    "front",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every area's subcommands."""
    parser = argparse.ArgumentParser(
        prog="slimrank",
        description="FAISS PQ retrieval plus distilled, pruned, int8 rankers, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"slimrank {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in _AREAS:
        try:
            module = importlib.import_module(f"slimrank.{area}.cli")
        except ModuleNotFoundError as err:
            if err.name != f"slimrank.{area}.cli":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # slimrank's own progress at INFO (DEBUG with -v); libraries (faiss's loader, the ONNX
    # exporter's passes) only warn unless -vv asks for everything.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # the command owns logging, even if a library configured it first
    )
    logging.getLogger("slimrank").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except SlimrankError as err:
        print(f"slimrank: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        # An offline command on the slim install (no torch, pandas, ...): say which extra.
        hint = install_hint(err)
        if hint is None:
            raise
        print(f"slimrank: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimrank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
