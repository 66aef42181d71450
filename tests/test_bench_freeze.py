"""The freeze of ``bench/serving_ab.py --freeze``: the load generator stops the server for a
while and never leaves it stopped, and bad freeze flags are refused before any run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from loadgen import run_aio, schedule_of  # noqa: E402

RECOMMEND = "/slimrank.v1.Recommender/Recommend"


def state(pid: int) -> str:
    """The process's scheduler state letter (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_run_that_ends_inside_the_freeze_lets_the_process_run_again() -> None:
    """The calls (to a port nothing listens on) all end within 0.1 s, long before the 60 s
    freeze would: the stopped process is let go when the run ends, not left stopped."""
    from loadgen import job_for

    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        freeze = {"pids": [stand_in.pid], "at_s": 0.0, "for_s": 60.0}
        job = job_for("127.0.0.1:1", RECOMMEND, [b""], rate=200.0, n=5, freeze=freeze)
        job.update(warmup=0, timeout_s=0.5)
        result = asyncio.run(run_aio(job, [b""], schedule_of(200.0, 5, 0)))
        assert (result["codes"] != 0).all()  # nothing answered: the run ended early
        assert state(stand_in.pid) != "T"
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_freeze_needs_the_aio_client() -> None:
    from loadgen import job_for

    with pytest.raises(ValueError, match="freeze needs the aio client"):
        job_for("t", RECOMMEND, [b""], 1.0, 1, client="sync", freeze={"pids": [], "at_s": 0})


@pytest.mark.parametrize(
    "flags",
    [["--freeze", "20"], ["--freeze", "nan"], ["--freeze", "0.5", "--freeze-at", "30"]],
)
def test_bad_freeze_flags_are_refused_naming_them(tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "CURRENT").write_text("v1\n")
    root = BENCH.parent
    trees = ["--a", f"x={root}", "--b", f"y={root}"]
    schedule = ["--bundles", str(tmp_path), "--rate", "100", "--calls", "1000"]
    done = subprocess.run(
        [sys.executable, str(BENCH / "serving_ab.py"), *trees, *schedule, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--freeze must be in [0, 10] s, --freeze-at within the schedule" in done.stderr


@pytest.mark.parametrize("client", ["aio", "sync"])
def test_the_warm_up_calls_that_fail_are_counted_by_status(client: str) -> None:
    """A server counts the warm-up calls too (refusals of a cold server's first bursts), so
    the load generator reports the ones that failed instead of dropping them."""
    from loadgen import job_for, run_sync

    job = job_for("127.0.0.1:1", RECOMMEND, [b""], rate=200.0, n=2, client=client)
    job.update(warmup=2 * job["channels"], timeout_s=0.5)  # aio warms in rounds of channels
    schedule = schedule_of(200.0, 2, 0)
    if client == "aio":
        result = asyncio.run(run_aio(job, [b""], schedule))
    else:
        result = run_sync(job, [b""], schedule)
    assert result["meta"]["warmup_errors"] == {"UNAVAILABLE": 2 * job["channels"]}
