"""``slimrank serve`` as a real subprocess, for the tests that start one: its ready line's
target, metrics address and pids, its /metrics counters, and a SIGTERM stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")


def start_ready(
    argv: list[str], ready: re.Pattern[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start ``python -m slimrank.cli ARGV``; return it and its first stdout line's match of
    ``ready``, or kill it and fail with its stderr when that line does not match."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimrank.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    match = ready.search(line)
    if match is None:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"no ready line, got {line!r}; stderr:\n{err}")
    return proc, match


def scrape(address: str) -> list[Sample]:
    """Every sample on ``http://ADDRESS/metrics``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


class Server:
    """A ``slimrank serve`` subprocess and the ports its ready line announced."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc, match = start_ready(["serve", "--port", "0", *args], READY, env)
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = None if match[3] == "-" else match[3]
        self.pids = [int(p) for p in match[4].split(",")]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the samples of ``name`` on the /metrics endpoint whose labels include these."""
        return sum(
            sample.value
            for sample in scrape(str(self.metrics))
            if sample.name == name and (labels or {}).items() <= sample.labels.items()
        )

    def terminate(self, timeout_s: float = 60) -> tuple[int, str]:
        """SIGTERM the server; return its exit code and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, err
