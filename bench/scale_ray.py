"""The Ray engine at scale: a cached ``bench/scale_steps.py`` run's user maps, again, on Ray.

For the run named by the same flags as ``bench/scale_steps.py`` (its step cache must hold the
data, embeddings, index, candidates and teacher steps), this runs in one process, one after
the other:

1. the candidates step (feature tables, then mining + features of each view) with the Ray
   engine (Ray Data batch maps over users on a local Ray instance), and with the local engine
   (``--no-local`` skips it and compares with the cached output only);
2. the teacher's scoring of every view with each engine, on the cached teacher.

Each is checked against the cached local output: the same users and candidates, labels and
padding, and the largest difference of features and scores. Wall time and the peak memory of
the whole process tree (PSS, so the object store's shared pages count once) are recorded per
phase. Results go to ``bench/results/scale_ray.{json,md}``.

    nice -n 10 .venv/bin/python bench/scale_ray.py --size 1000000x1000000x20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.features_scale import cpu_flags  # noqa: E402
from bench.scale_steps import add_run_args, parse_run_args, run_config, world_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class TreeMemory:
    """Samples the PSS of this process and its descendants (Ray's workers, raylet, GCS and
    object store) in a thread; :meth:`phase` returns the peak since the last call."""

    def __init__(self, every_s: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._every = every_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            with contextlib.suppress(self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                total += proc.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            sample = self._sample()  # slow (smaps); taken before the lock, so a phase that
            with self._lock:  # ends meanwhile does not get its predecessor's peak back
                self._peak = max(self._peak, sample)

    def phase(self) -> float:
        """Return the peak PSS in MiB since the last call, and start a new phase."""
        sample = self._sample()
        with self._lock:
            peak = max(self._peak, sample)
            self._peak = 0
        return round(peak / 2**20)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def compare_views(got: Any, want: Any) -> dict[str, Any]:
    """Compare two candidates artifacts view by view."""
    out: dict[str, Any] = {}
    for view, (w_cands, w_feats, w_labels) in want.views.items():
        g_cands, g_feats, g_labels = got.views[view]
        same = np.array_equal(g_cands.user, w_cands.user) and np.array_equal(
            g_cands.items, w_cands.items
        )
        mask = w_cands.mask
        out[view] = {
            "users": len(w_cands.user),
            "same_candidates": bool(same),
            "same_labels": bool(np.array_equal(g_labels, w_labels)),
            "same_feature_names": tuple(g_feats.names) == tuple(w_feats.names),
            "max_abs_retrieval_score": float(
                np.abs(g_cands.retrieval_score[mask] - w_cands.retrieval_score[mask]).max()
            )
            if same
            else None,
            "max_abs_feature": float(np.abs(g_feats.values - w_feats.values).max())
            if same
            else None,
        }
    return out


def compare_scores(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    """Compare teacher scores view by view (``-inf`` at the same pads, largest difference)."""
    out: dict[str, Any] = {}
    for view, w in want.items():
        g = got[view]
        real = np.isfinite(w)
        out[view] = {
            "same_pads": bool(np.array_equal(np.isfinite(g), real)),
            "max_abs_score": float(np.abs(g[real] - w[real]).max()) if real.any() else 0.0,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser)
    parser.add_argument("--batch-users", type=int, default=256, help="users per Ray Data batch")
    parser.add_argument(
        "--no-local",
        action="store_true",
        help="do not run the local engine beside Ray (compare with the cached output only)",
    )
    args = parse_run_args(parser)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("slimrank").setLevel(logging.INFO)

    from slimrank.pipeline import steps
    from slimrank.pipeline.artifacts import (
        CandidatesArtifact,
        DataArtifact,
        EmbeddingsArtifact,
        IndexArtifact,
        TeacherArtifact,
    )
    from slimrank.pipeline.engine import EngineConfig, LocalEngine
    from slimrank.pipeline.ray_engine import RayEngine
    from slimrank.pipeline.run import cached_step_paths

    config, overrides = run_config(args, world_dir(args))
    paths = cached_step_paths(config)
    missing = [
        s for s in ("data", "embeddings", "index", "candidates", "teacher") if not paths[s].exists()
    ]
    if missing:
        raise SystemExit(
            f"{config.cache_dir}: no cached {', '.join(missing)} step of this run; run "
            "bench/scale_steps.py with the same flags first"
        )
    data = DataArtifact.load(paths["data"])
    emb = EmbeddingsArtifact.load(paths["embeddings"])
    index = IndexArtifact.load(paths["index"])
    cached = CandidatesArtifact.load(paths["candidates"])
    teacher = TeacherArtifact.load(paths["teacher"])
    k = config.k
    memory = TreeMemory()
    memory.phase()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "run": config.cache_dir,
        "overrides": overrides,
        "batch_users": args.batch_users,
        "cpu": cpu_flags(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_before": [round(x, 2) for x in load_before],
    }

    def timed(label: str, fn: Any) -> Any:
        started, cpu = time.perf_counter(), time.process_time()
        out = fn()
        rows.append(
            {
                "phase": label,
                "wall_s": round(time.perf_counter() - started, 1),
                "driver_cpu_s": round(time.process_time() - cpu, 1),
                "peak_pss_mib": memory.phase(),
                "load_after": round(os.getloadavg()[0], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        return out

    def candidates(engine: Any) -> Any:
        return steps.candidates_step(config.candidates, k, data, emb, index, engine)

    def scores(engine: Any) -> dict[str, np.ndarray]:
        return {v: engine.teacher_scores(teacher.model, cached.views[v][1]) for v in cached.views}

    with RayEngine.open(EngineConfig(kind="ray", batch_users=args.batch_users)) as ray_engine:
        memory.phase()  # Ray's start-up
        got = timed("candidates, Ray engine", lambda: candidates(ray_engine))
        report["candidates_ray_vs_cached"] = compare_views(got, cached)
        del got
        got_scores = timed("teacher scoring, Ray engine", lambda: scores(ray_engine))
        report["scores_ray_vs_cached"] = compare_scores(got_scores, teacher.scores)
        del got_scores
    if not args.no_local:
        local = LocalEngine()
        got = timed("candidates, local engine", lambda: candidates(local))
        report["candidates_local_vs_cached"] = compare_views(got, cached)
        del got
        got_scores = timed("teacher scoring, local engine", lambda: scores(local))
        report["scores_local_vs_cached"] = compare_scores(got_scores, teacher.scores)
    memory.stop()
    report["phases"] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_ray.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "scale_ray.md").write_text(render(report, sys.argv[1:]))
    print(render(report, sys.argv[1:]))
    ok = all(
        v["same_candidates"] and v["same_labels"]
        for key in ("candidates_ray_vs_cached", "candidates_local_vs_cached")
        for v in report.get(key, {}).values()
    )
    return 0 if ok else 1


def render(report: dict[str, Any], argv: list[str]) -> str:
    """Return the Markdown report."""
    out = [
        "# The Ray engine at scale",
        "",
        f"`bench/scale_ray.py {' '.join(argv)}` on the cached run `{report['run']}` "
        f"(overrides `{json.dumps(report['overrides'])}`), {report['date']}, "
        f"{report['cpus']} CPUs ({report['cpu']}), load average before "
        f"{report['load_before']}. Ray: a local instance, Ray Data batches of "
        f"{report['batch_users']} users. Peak memory: PSS of this process and every child "
        "(Ray's workers, raylet, GCS, object store) sampled each second.",
        "",
        "| phase | wall s | driver CPU s | peak PSS MiB | load after |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["phases"]:
        pss = "-" if r["peak_pss_mib"] is None else f"{r['peak_pss_mib']:,}"
        out.append(
            f"| {r['phase']} | {r['wall_s']:,.1f} | {r['driver_cpu_s']:,.1f} | "
            f"{pss} | {r['load_after']} |"
        )
    if report.get("note"):
        out += ["", report["note"]]
    for key, title in (
        ("candidates_ray_vs_cached", "Ray engine's candidates vs the cached local run"),
        ("candidates_local_vs_cached", "local engine's candidates, again, vs the cached run"),
    ):
        if key not in report:
            continue
        out += ["", f"{title}:", ""]
        out += [
            "| view | users | same candidates | same labels | max abs retrieval score | "
            "max abs feature |",
            "|---|---:|---|---|---:|---:|",
        ]
        for view, v in report[key].items():
            out.append(
                f"| {view} | {v['users']:,} | {v['same_candidates']} | {v['same_labels']} | "
                f"{v['max_abs_retrieval_score']} | {v['max_abs_feature']} |"
            )
    for key, title in (
        ("scores_ray_vs_cached", "Ray engine's teacher scores vs the cached run's"),
        ("scores_local_vs_cached", "local engine's teacher scores, again, vs the cached run's"),
    ):
        if key not in report:
            continue
        out += [
            "",
            f"{title}: "
            + "; ".join(
                f"{view} same pads {v['same_pads']}, max abs difference {v['max_abs_score']:.2e}"
                for view, v in report[key].items()
            ),
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
