"""``slimrank bundle list | show | verify | promote | rollback | history | diff``.

Every subcommand takes ``--root DIR`` (default ``$SLIMRANK_BUNDLES``, else ``./bundles``).
Integrity failures raise ``IntegrityError``, which the top-level CLI prints, exiting 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimrank.bundle import store
from slimrank.bundle.manifest import (
    MANIFEST,
    Manifest,
    diff_manifests,
    flat_metrics,
    read_manifest,
)
from slimrank.bundle.root import ROOT_HELP, bundles_root
from slimrank.errors import IntegrityError

# How many metrics `list` shows per version (the first ones in dotted-key order).
_LIST_METRICS = 4


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bundle`` command and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", "--bundles", dest="root", type=Path, help=ROOT_HELP)
    bundle = sub.add_parser("bundle", help="list, verify, promote and roll back model bundles")
    cmds = bundle.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("list", parents=[common], help="versions, metrics and which is CURRENT")
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("show", parents=[common], help="print a version's manifest")
    p.add_argument("version", nargs="?", help="version name or sequence number (default CURRENT)")
    p.set_defaults(func=cmd_show)
    p = cmds.add_parser("verify", parents=[common], help="check every file's size and sha256")
    p.add_argument("version", nargs="?", help="version name or sequence number (default CURRENT)")
    p.set_defaults(func=cmd_verify)
    p = cmds.add_parser("promote", parents=[common], help="verify a version, then make it CURRENT")
    p.add_argument("version", help="version name or sequence number")
    p.set_defaults(func=cmd_promote)
    p = cmds.add_parser(
        "rollback", parents=[common], help="CURRENT -> the previously served version that verifies"
    )
    p.set_defaults(func=cmd_rollback)
    p = cmds.add_parser("history", parents=[common], help="every move of CURRENT, newest last")
    p.set_defaults(func=cmd_history)
    p = cmds.add_parser("diff", parents=[common], help="files and metrics that differ")
    p.add_argument("old", help="version name or sequence number")
    p.add_argument("new", nargs="?", help="version name or sequence number (default CURRENT)")
    p.set_defaults(func=cmd_diff)


def _root(args: argparse.Namespace) -> Path:
    """Return ``--root`` (or ``--bundles``), else ``$SLIMRANK_BUNDLES``, else ``./bundles``."""
    return bundles_root(args.root)


def _console() -> Console:
    # Created per call so that it writes to whatever sys.stdout is now; wide enough for
    # version names and a few metrics when stdout is not a terminal.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def _gate_text(gate: dict) -> str:
    """``pass (MODE)`` or ``FAIL`` from the int8 gate's summary (``accepted``, ``mode``, as
    the pipeline's int8 step writes it); empty for a bundle published without one."""
    accepted = gate.get("accepted")
    if accepted is None:
        return ""
    if not accepted:
        return "FAIL"
    return f"pass ({gate['mode']})" if gate.get("mode") else "pass"


def cmd_list(args: argparse.Namespace) -> int:
    """Print a table of versions; CURRENT is marked with ``*``."""
    root = _root(args)
    versions = store.list_versions(root)
    console = _console()
    if not versions:
        console.print(f"no bundles in {root}")
        return 0
    try:
        current = store.current_version(root)
    except IntegrityError as err:
        console.print(f"[bold red]warning:[/] {err}")
        current = None
    table = Table(title=f"bundles in {root}")
    table.add_column("", no_wrap=True)
    for column in ("version", "created", "parent", "files", "gate", "metrics"):
        table.add_column(column, no_wrap=column != "metrics")
    for version in reversed(versions):
        mark = "*" if version == current else ""
        try:
            m = read_manifest(root / version / MANIFEST)
        except IntegrityError:
            table.add_row(mark, version, "", "", "", "", "[red]unreadable manifest[/]")
            continue
        metrics = flat_metrics(m.metrics)
        shown = sorted(metrics)[:_LIST_METRICS]
        table.add_row(
            mark,
            version,
            m.created,
            m.parent or "-",
            f"{len(m.files)} ({_size(m.total_bytes)})",
            _gate_text(dict(m.gate)),
            " ".join(f"{k}={metrics[k]:.4g}" for k in shown),
        )
    console.print(table)
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def cmd_show(args: argparse.Namespace) -> int:
    """Print the manifest of a version as JSON."""
    root = _root(args)
    version = store.resolve_version(root, args.version)
    manifest = read_manifest(root / version / MANIFEST)
    sys.stdout.write(manifest.to_json().decode())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a version; ``IntegrityError`` (exit 2) names every bad file."""
    root = _root(args)
    bundle = store.open_bundle(root, args.version)
    m = bundle.manifest
    print(f"{bundle.version}: OK ({len(m.files)} files, {m.total_bytes} bytes verified)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Make a verified version CURRENT."""
    old, new = store.promote(_root(args), args.version)
    print(f"CURRENT: {old or '(none)'} -> {new}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move CURRENT back to the most recently served earlier version that verifies."""
    old, new, skipped = store.rollback(_root(args))
    for reason in skipped:
        print(f"skipped {reason}")
    print(f"rolled back CURRENT: {old} -> {new}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Print every publish, promote and rollback that moved CURRENT."""
    root = _root(args)
    table = Table(title=f"CURRENT history in {root}")
    for column in ("at", "action", "from", "to"):
        table.add_column(column, no_wrap=True)
    for entry in store.read_history(root):
        table.add_row(
            str(entry.get("at", "")),
            str(entry.get("action", "")),
            str(entry.get("from") or "-"),
            entry["version"],
        )
    _console().print(table)
    return 0


def _load(root: Path, name: str | None) -> Manifest:
    version = store.resolve_version(root, name)
    return read_manifest(root / version / MANIFEST)


def cmd_diff(args: argparse.Namespace) -> int:
    """Print the files and metrics that differ between two versions (as JSON)."""
    root = _root(args)
    old, new = _load(root, args.old), _load(root, args.new)
    d = diff_manifests(old, new)
    out = {
        "old": old.version,
        "new": new.version,
        "added": list(d.added),
        "removed": list(d.removed),
        "changed": list(d.changed),
        "metrics": {k: list(v) for k, v in d.metrics.items()},
    }
    print(json.dumps(out, indent=2))
    return 0
