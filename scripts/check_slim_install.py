"""Check the slim server install for real: ``pip install .`` into a fresh venv, then serve.

``make check-slim-install`` runs it (it downloads the core dependencies, so ``make test`` does
not). In a temporary virtualenv it installs the repository without extras, checks that torch,
pandas, pyarrow, onnx and matplotlib are not installed, starts ``slimrank serve`` from that
venv on a pipeline bundle, checks the process maps none of them, asks for a known and a new
user's recommendations with ``slimrank query``, runs the bundle commands, checks that an
offline command prints the one-line ``pip install 'slimrank[train]'`` hint, and prints the
venv's size and the server's resident memory.

Uses only the standard library, so any Python 3.11 can run it::

    python3.11 scripts/check_slim_install.py --bundles runs/demo/bundles
    python3.11 scripts/check_slim_install.py --build-tiny-with .venv/bin/slimrank
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_ONLY = ("torch", "pandas", "pyarrow", "onnx", "onnxscript", "matplotlib")
LIBRARIES = re.compile(r"/site-packages/(torch|pandas|pyarrow|matplotlib|onnx)/|libtorch|libarrow")
READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")
HINT = "pip install 'slimrank[train]'"


def step(text: str) -> None:
    print(f"check-slim-install: {text}", flush=True)


def fail(text: str) -> None:
    print(f"check-slim-install: FAILED: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(*argv: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], text=True, check=False, **kwargs)


def size_mib(path: Path) -> float:
    """Return the bytes of the files under ``path`` in MiB (as du -s --apparent-size)."""
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return sum(p.stat().st_size for p in files) / 2**20


def create_venv(venv: Path, python: str) -> Path:
    step(f"python -m venv {venv} and pip install {REPO} (no extras)")
    if run(python, "-m", "venv", venv).returncode:
        fail("venv creation failed")
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    run(*pip, "--upgrade", "pip")
    if run(*pip, REPO).returncode:
        fail("pip install of the slim package failed")
    return venv / "bin"


def check_not_installed(bin_dir: Path) -> None:
    code = (
        "import importlib.util as u, json; "
        f"print(json.dumps([m for m in {TRAIN_ONLY!r} if u.find_spec(m)]))"
    )
    done = run(bin_dir / "python", "-c", code, capture_output=True)
    present = json.loads(done.stdout)
    if present:
        fail(f"the slim install has {present}")
    step(f"not installed: {', '.join(TRAIN_ONLY)}")


def build_tiny(slimrank: str, work: Path) -> Path:
    step(f"building the tiny pipeline bundle with {slimrank} (the shipped config tiny)")
    bundles = work / "bundles"
    done = run(
        slimrank, "pipeline", "--config", "tiny", "--bundles", bundles, "--out", work / "report",
        "--cache-dir", work / "cache", capture_output=True,
    )  # fmt: skip
    if done.returncode or not (bundles / "CURRENT").is_file():
        fail(f"the tiny pipeline exited {done.returncode}:\n{done.stderr[-2000:]}")
    return bundles


def some_ids(bin_dir: Path, bundles: Path) -> tuple[str, list[str]]:
    """Return a known user id and three item ids of the CURRENT bundle (read in the slim venv)."""
    code = """
import json, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1])
bundle = root / (root / "CURRENT").read_text().strip()
spec = json.loads((bundle / "serving.json").read_text())
users = np.load(bundle / spec["users"]["ids"], allow_pickle=False)
items = np.load(bundle / spec["items"]["ids"], allow_pickle=False)
print(json.dumps([str(users[0]), [str(i) for i in items[:3]]]))
"""
    done = run(bin_dir / "python", "-c", code, bundles, capture_output=True)
    if done.returncode:
        fail(f"cannot read the bundle's ids: {done.stderr}")
    user, items = json.loads(done.stdout)
    return user, items


def serve_and_query(bin_dir: Path, bundles: Path) -> int:
    """Serve, check the process, query; return the server's VmRSS in KiB."""
    slimrank = bin_dir / "slimrank"
    argv = [slimrank, "serve", "--bundles", bundles, "--port", "0", "--metrics-port", "-1"]
    server = subprocess.Popen(
        [*map(str, argv), "--admin-insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        match = READY.search(line)
        if match is None:
            server.kill()
            fail(f"no ready line from slimrank serve: {line!r}\n{server.communicate()[1]}")
        target, pid = f"{match[1]}:{match[2]}", int(match[4].split(",")[0])
        step(f"slimrank serve (pid {pid}) serving on {target}")
        maps = Path(f"/proc/{pid}/maps").read_text()
        heavy = sorted({ln.split()[-1] for ln in maps.splitlines() if LIBRARIES.search(ln)})
        if heavy:
            fail(f"the server mapped {heavy}")
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])
        user, items = some_ids(bin_dir, bundles)
        known = ["--user", user, "--bundles", str(bundles)]  # with titles for MovieLens
        for args, source in ((known, "known"), (["--recent", ",".join(items)], "recent")):
            done = run(slimrank, "query", "--target", target, "-k", "5", *args, capture_output=True)
            if done.returncode or f"({source})" not in done.stdout:
                fail(f"slimrank query {' '.join(args)}:\n{done.stdout}{done.stderr}")
            print(done.stdout, end="")
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=60) != 0:
            fail(f"the server exited {server.returncode} on SIGTERM")
        return rss
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def check_offline_commands(bin_dir: Path, bundles: Path, work: Path) -> None:
    for sub in (["list"], ["verify"], ["history"]):
        done = run(bin_dir / "slimrank", "bundle", *sub, "--root", bundles, capture_output=True)
        if done.returncode:
            fail(f"slimrank bundle {sub[0]}: {done.stderr}")
    step("slimrank bundle list / verify / history ran")
    done = run(
        bin_dir / "slimrank", "pipeline", "--config", "tiny",
        "--bundles", work / "offline-bundles", "--out", work / "offline-out",
        "--cache-dir", work / "offline-cache", capture_output=True,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    if done.returncode != 2 or len(lines) != 1 or HINT not in lines[0]:
        fail(f"slimrank pipeline on the slim install exited {done.returncode}:\n{done.stderr}")
    step(f"slimrank pipeline on the slim install: {lines[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, help="a pipeline bundle store with CURRENT")
    parser.add_argument(
        "--build-tiny-with", help="a full install's slimrank, to build the tiny bundle if needed"
    )
    parser.add_argument("--python", default=sys.executable, help="the venv's Python")
    parser.add_argument("--full-venv", type=Path, help="a full install's venv, to compare sizes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slimrank-slim-"))
    try:
        bin_dir = create_venv(work / "venv", args.python)
        check_not_installed(bin_dir)
        slim = size_mib(work / "venv")
        bundles = args.bundles
        if bundles is None or not (bundles / "CURRENT").is_file():
            if not args.build_tiny_with:
                fail(f"{bundles} has no CURRENT; pass --bundles or --build-tiny-with")
            bundles = build_tiny(args.build_tiny_with, work)
        rss = serve_and_query(bin_dir, bundles.resolve())
        check_offline_commands(bin_dir, bundles.resolve(), work)
        step(f"slim venv {slim:.0f} MiB")
        if args.full_venv is not None and args.full_venv.is_dir():
            step(f"full venv {args.full_venv}: {size_mib(args.full_venv):.0f} MiB")
        step(f"server VmRSS {rss / 1024:.0f} MiB on {bundles}")
        step("OK")
        return 0
    finally:
        if args.keep:
            step(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
