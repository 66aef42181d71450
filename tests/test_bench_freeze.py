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


def serving_ab_refusal(bundles: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run ``bench/serving_ab.py`` with two labels of this checkout, a fake bundles root
    (``CURRENT`` only: no server can start from it) and ``flags``, which it must refuse."""
    (bundles / "CURRENT").write_text("v1\n")
    root = BENCH.parent
    trees = ["--a", f"x={root}", "--b", f"y={root}", "--bundles", str(bundles)]
    return subprocess.run(
        [sys.executable, str(BENCH / "serving_ab.py"), *trees, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


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
    done = serving_ab_refusal(tmp_path, "--rate", "100", "--calls", "1000", *flags)
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


def test_a_variants_own_flags_are_split_as_a_shell_would_and_bad_quoting_is_refused(
    tmp_path: Path,
) -> None:
    """``--b-flags`` compares one tree under two flag sets; a flag string a shell could not
    split is refused with exit 2 naming the option, before any server starts."""
    from serving_ab import serve_flags

    assert serve_flags('--max-wait-ms 2 --label "a b"') == ["--max-wait-ms", "2", "--label", "a b"]
    assert serve_flags("") == []
    done = serving_ab_refusal(tmp_path, "--b-flags", '--max-wait-ms "2')
    assert done.returncode == 2, done.stderr
    assert "argument --b-flags" in done.stderr and "No closing quotation" in done.stderr


def test_the_summary_gives_refusal_latency_medians_over_the_runs_that_refused() -> None:
    from serving_ab import summarize

    def run(variant: str, pair: int, refused: int, p50: float | None) -> dict:
        p99 = None if p50 is None else 3 * p50
        return {
            "variant": variant,
            "pair": pair,
            "refused": refused,
            "p99_ms": 9.0,
            "server_cpu_ms_per_call": 1.0,
            "refusal_p50_ms": p50,
            "refusal_p99_ms": p99,
        }

    runs = [run("a", 0, 5, 4.0), run("b", 0, 0, None), run("a", 1, 9, 6.0), run("b", 1, 2, 2.0)]
    summary = summarize(runs, "a", "b")
    assert summary["a"]["refusal_p50_ms"] == 5.0 and summary["a"]["refusal_p99_ms"] == 15.0
    assert summary["b"]["refusal_p50_ms"] == 2.0  # the run without a refusal is left out
    assert summary["b_fewer_refused"] == 2 and summary["a_fewer_refused"] == 0


def test_a_variants_environment_is_key_value_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    """``--b-env`` runs one variant's server under another environment (e.g. a gRPC
    experiment); a value keeps its own ``=``, and an entry without ``KEY=`` is refused with
    exit 2 naming the option, before any server starts."""
    from serving_ab import serve_env

    assert serve_env("GRPC_EXPERIMENTS=ph2_server") == ("GRPC_EXPERIMENTS", "ph2_server")
    assert serve_env("A=b=c") == ("A", "b=c")
    assert serve_env("EMPTY=") == ("EMPTY", "")
    for bad in ("GRPC_EXPERIMENTS", "=x"):
        done = serving_ab_refusal(tmp_path, "--b-env", bad)
        assert done.returncode == 2, done.stderr
        assert "argument --b-env" in done.stderr and "want KEY=VALUE" in done.stderr
    done = serving_ab_refusal(tmp_path, "--a-env", "K=1", "--a-env", "K=2")
    assert done.returncode == 2, done.stderr
    assert "--a-env: a key given twice" in done.stderr


def test_the_report_names_each_variants_environment() -> None:
    """What a results file says about a variant's environment (the command alone would not
    show which run had it): the committed ph2 A/B's report, rendered again."""
    import json

    from serving_ab import markdown

    saved = BENCH / "results" / "serving_ab_s23-core-pending-1400.json"
    report = json.loads(saved.read_text())
    assert report["env"] == {"default": {}, "ph2-cap2": {"GRPC_EXPERIMENTS": "ph2_server"}}
    text = markdown(report)
    assert "ph2-cap2's environment `GRPC_EXPERIMENTS=ph2_server`" in text
    assert "default's environment" not in text
    assert text == saved.with_suffix(".md").read_text()
