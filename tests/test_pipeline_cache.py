"""Step outputs are reused when nothing changed, redone when anything did, never half-visible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimrank.pipeline.cache import StepCache, step_digest


def write_value(value: str):
    calls = []

    def fn(out: Path) -> None:
        calls.append(value)
        (out / "value.txt").write_text(value)

    return fn, calls


def test_same_inputs_reuse_the_output(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    fn, calls = write_value("a")
    first = cache.run("train", {"lr": 0.1}, {"data": "d1"}, fn)
    second = cache.run("train", {"lr": 0.1}, {"data": "d1"}, fn)
    assert calls == ["a"]
    assert not first.cached and second.cached
    assert second.path == first.path and (first.path / "value.txt").read_text() == "a"


def test_changed_config_or_input_reruns() -> None:
    base = step_digest("train", {"lr": 0.1}, {"data": "d1"})
    assert step_digest("train", {"lr": 0.2}, {"data": "d1"}) != base
    assert step_digest("train", {"lr": 0.1}, {"data": "d2"}) != base
    assert step_digest("index", {"lr": 0.1}, {"data": "d1"}) != base
    # Key order does not matter.
    assert step_digest("t", {"a": 1, "b": 2}, {}) == step_digest("t", {"b": 2, "a": 1}, {})


def test_failed_step_leaves_nothing(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)

    def boom(out: Path) -> None:
        (out / "half.txt").write_text("x")
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        cache.run("train", {}, {}, boom)
    assert list(tmp_path.iterdir()) == []


def test_killed_step_is_invisible_and_cleaned(tmp_path: Path) -> None:
    # A real process killed with SIGKILL in the middle of a step.
    ready = tmp_path / "ready"
    script = f"""
import time
from pathlib import Path
from slimrank.pipeline.cache import StepCache
def fn(out):
    (out / "half.txt").write_text("x")
    Path({str(ready)!r}).write_text("1")
    time.sleep(60)
StepCache({str(tmp_path / "cache")!r}).run("train", {{}}, {{}}, fn)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the step never started"
            assert proc.poll() is None, "the step process died early"
            time.sleep(0.05)
        # Another run cleaning the same cache must leave a live step alone.
        live = StepCache(tmp_path / "cache")
        assert live.clean_partial() == []
        assert len(list((tmp_path / "cache").glob(".tmp-train-*/half.txt"))) == 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    cache = StepCache(tmp_path / "cache")
    assert not cache.path_for("train", step_digest("train", {}, {})).exists()
    assert len(cache.clean_partial()) == 1
    fn, calls = write_value("b")
    out = cache.run("train", {}, {}, fn)
    assert calls == ["b"] and not out.cached
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [out.path.name]
