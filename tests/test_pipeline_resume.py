"""A pipeline run interrupted (SIGINT, as Ctrl-C) mid-step resumes from the step cache: the
restarted run takes every finished step from the cache and runs only the rest."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from slimrank.bundle import current_version
from slimrank.pipeline.run import STEPS

TINY = Path(__file__).resolve().parent.parent / "slimrank" / "configs" / "tiny.toml"
# Interrupt once this step has finished: the next one (student_plain) trains for seconds.
AFTER = "teacher"


def _command(root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "slimrank.cli",
        "pipeline",
        "--config",
        str(TINY),
        "--cache-dir",
        str(root / "cache"),
        "--bundles",
        str(root / "bundles"),
        "--out",
        str(root / "out"),
    ]


def _step_lines(output: str) -> dict[str, str]:
    """Return step name -> "cached" or "done" from the CLI's one line per finished step."""
    found = re.findall(r"\[\s*\d+/\d+\] (\w+)\s+(cached|done)", output)
    return dict(found)


def test_an_interrupted_run_resumes_from_the_step_cache(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        _command(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(rf"\] {AFTER}\s+done", line):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    first = "".join(seen) + rest
    assert proc.returncode == 130, first
    assert "slimrank: interrupted" in first
    finished = list(_step_lines(first))
    upto = STEPS.index(AFTER) + 1
    assert finished == list(STEPS[:upto]), first  # the interrupt landed in the next step
    assert current_version(tmp_path / "bundles") is None  # nothing published
    cache = tmp_path / "cache"
    # The interrupted step left nothing behind: no partial output, no output under its name.
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp")]
    assert not list(cache.glob(f"{STEPS[upto]}-*"))

    again = subprocess.run(
        _command(tmp_path), capture_output=True, text=True, env=env, timeout=600, check=False
    )
    second = again.stdout + again.stderr
    assert again.returncode == 0, second
    how = _step_lines(second)
    assert list(how) == list(STEPS)
    assert all(how[s] == "cached" for s in STEPS[:upto]), how
    assert all(how[s] == "done" for s in STEPS[upto:]), how
    assert current_version(tmp_path / "bundles") is not None
    # The students train on the teacher's threads (1 in tiny.toml) whether the teacher step
    # ran or came from the cache; before, a resumed run trained them on torch's default.
    threads = re.findall(r"student (\w+): training on (\d+) torch threads", second)
    assert [kind for kind, _ in threads] == ["plain", "distill", "pseudo"], second
    assert {n for _, n in threads} == {"1"}, threads
