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

READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")


class Server:
    """A ``slimrank serve`` subprocess and the ports its ready line announced."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slimrank.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = READY.search(line)
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"no ready line, got {line!r}; stderr:\n{err}")
        self.target = f"{match[1]}:{match[2]}"
        self.metrics = None if match[3] == "-" else match[3]
        self.pids = [int(p) for p in match[4].split(",")]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the samples of ``name`` on the /metrics endpoint whose labels include these."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and (labels or {}).items() <= sample.labels.items():
                    total += sample.value
        return total

    def terminate(self, timeout_s: float = 60) -> tuple[int, str]:
        """SIGTERM the server; return its exit code and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, err
