"""``scripts/demo_serve.py`` (the end of ``make demo``) over a tiny published pipeline bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipeline import TinyRun, tiny_pipeline

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_serve.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_pipeline(tmp_path_factory)


def _demo(bundles: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--bundles", str(bundles), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_demo_serves_queries_times_and_stops_cleanly(run: TinyRun) -> None:
    done = _demo(run.bundles, "--requests", "40")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count(f"candidates ranked by model {run.version}") == 4
    assert out.count("(known)") == 3 and "user new-user (recent)" in out
    # A frontend without gRPC: the same user's items over HTTP/JSON, checked against gRPC.
    assert "HTTP/JSON: curl -s http://127.0.0.1:" in out
    assert "answers the same 10 items as gRPC for user" in out
    assert "40 sequential Recommend calls" in out and "p99" in out
    assert out.rstrip().endswith("SIGTERM: the server drained and exited 0")


def test_demo_fails_with_the_servers_reason_when_nothing_is_published(tmp_path: Path) -> None:
    done = _demo(tmp_path / "empty")
    assert done.returncode == 1
    assert "the server exited with 2 before it was ready" in done.stderr
    assert "no CURRENT version" in done.stderr  # the server's own error, from its log
