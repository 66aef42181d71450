"""``bench/online_path.py`` refuses bad spacing flags, naming them, before it loads anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "flags", [["--gap-ms", "-1"], ["--spaced-calls", "0"], ["--spaced-calls", "-5"]]
)
def test_bad_spacing_flags_are_refused_naming_them(tmp_path: Path, flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "bench/online_path.py", "--bundles", str(tmp_path), "--no-save", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--gap-ms must be >= 0 and --spaced-calls >= 1" in done.stderr
    assert "Traceback" not in done.stderr
