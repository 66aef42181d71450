"""The online path on ``make demo``'s ml-100k bundle: stage costs, the teacher behind the same
features, and served quality against the offline evaluation.

1. **Stages in process** (the server's own snapshot, :func:`slimrank.serving.loader.
   load_snapshot`): resolve, retrieve (FAISS + exclusion), features, the served int8 ranker and
   the fp32 teacher (exported to ONNX, fed the same features), for known users with 200
   candidates; interleaved call by call; p50 / p99 over ``--calls`` calls. Then the same
   stages with ``--gap-ms`` of busy waiting before each request: spaced a few milliseconds
   apart, as a server's requests are, every stage runs slower than back to back (on this VM
   1.4-4x). The core never idles meanwhile, so it is not a sleep state; most likely the
   tables leave the caches. This is why a server's stage times exceed the back-to-back
   floors.
2. **The teacher bundle**: the demo bundle with ``ranker.onnx`` replaced by the teacher's fp32
   ONNX export, published to ``bench/.cache/teacher_bundles`` so that ``bench/serving.py`` can
   serve it behind the same server and features (``--teacher-bundles``).
3. **Served quality** through ``slimrank serve`` and the real client: every test user's top 10,
   test NDCG@10 of the served lists, and how many users' lists equal the offline evaluation's
   (the pipeline's cached test view ranked by the bundle's ranker), in the same order.

    .venv/bin/python bench/online_path.py          # after make demo; about a minute

Writes ``bench/results/online_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.features_scale import cpu_flags  # noqa: E402

DEMO_BUNDLES = ROOT / "runs" / "demo" / "bundles"
TEACHER_BUNDLES = HERE / ".cache" / "teacher_bundles"
RESULTS = HERE / "results"
K = 10


def pct(seconds: np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.median(ms)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
    }


def teacher_onnx(bundle: Any, out: Path) -> Path:
    """Export the bundle's teacher (torch, safetensors) to an fp32 ONNX ranker of raw features."""
    from slimrank.compression.export import export_onnx
    from slimrank.ranking.teacher import load_teacher

    model, names = load_teacher(bundle.path / "teacher")
    if model.config.id_dim:
        raise SystemExit("the teacher embeds ids: it cannot be served on features alone")
    return export_onnx(model, out, len(names))


def publish_teacher_bundle(bundle: Any, onnx_path: Path, root: Path) -> str:
    """Publish a copy of ``bundle`` whose ranker is the teacher; return its version."""
    from slimrank.bundle import publish
    from slimrank.bundle.formats import read_json, write_json

    if root.exists():
        shutil.rmtree(root)

    def write(directory: Path) -> None:
        for name in bundle.manifest.files:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / name, target)
        shutil.copyfile(onnx_path, directory / "ranker.onnx")
        spec = read_json(directory / "serving.json")
        spec["ranker"]["int8_mode"] = "teacher fp32"
        write_json(directory / "serving.json", spec)

    m = bundle.manifest
    return publish(root, write, config=m.config, metrics=m.metrics, gate=m.gate, parent=m.parent)


def busy_wait(seconds: float) -> None:
    """Spin for ``seconds`` (the core stays busy with this process: it never idles)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def stages(
    snapshot: Any, teacher: Any | None, calls: int, gap_s: float = 0.0
) -> dict[str, dict[str, float]]:
    """Time each stage of the served request for random known users; then, with a
    ``teacher``, the int8 ranker and the teacher on the same features, interleaved call by
    call (the ranker-only ratio).

    The teacher is timed in its own loop so that its 5 ms of BLAS work does not evict the
    served path's tables from the caches between the stages being timed, and the features it
    scores are computed again after the timed loop: kept during it (300 arrays of 200 kB),
    each request's arrays came from fresh pages, and the features' p99 read 0.45-1.03 ms in
    10 runs against 0.36-0.41 ms in 6 without (Intel Xeon, session 29; p50 the same), a cost
    the server, which frees each request's arrays, does not pay. ``gap_s``: a busy wait
    before each request, as when requests arrive a few milliseconds apart.
    """
    rng = np.random.default_rng(0)
    users = rng.integers(0, len(snapshot.user_ids), calls + 50)
    n = snapshot.n_candidates
    names = ("resolve", "retrieve", "features", "rank_int8", "request_int8")
    times = {name: np.empty(calls) for name in names}
    for i, u in enumerate(users):
        if gap_s:
            busy_wait(gap_s)
        t0 = time.perf_counter()
        query = snapshot.user_query(str(snapshot.user_ids[u]), [])
        t1 = time.perf_counter()
        retrieved = snapshot.retrieve(query, n, snapshot.seen_rows(query.row))
        t2 = time.perf_counter()
        feats = snapshot.featurize(query, retrieved)
        t3 = time.perf_counter()
        scores = snapshot.score(feats)
        np.argsort(-scores, kind="stable")[:K]
        t4 = time.perf_counter()
        if i < 50:
            continue  # warm-up
        j = i - 50
        times["resolve"][j] = t1 - t0
        times["retrieve"][j] = t2 - t1
        times["features"][j] = t3 - t2
        times["rank_int8"][j] = t4 - t3
        times["request_int8"][j] = t4 - t0
    if teacher is None:
        return {name: pct(value) for name, value in times.items()}
    queries = [snapshot.user_query(str(snapshot.user_ids[u]), []) for u in users[50:350]]
    kept = [
        snapshot.featurize(q, snapshot.retrieve(q, n, snapshot.seen_rows(q.row))) for q in queries
    ]
    pair = {"rank_int8_paired": np.empty(len(kept)), "rank_teacher_paired": np.empty(len(kept))}
    for j, feats in enumerate(kept):
        t0 = time.perf_counter()
        snapshot.score(feats)
        t1 = time.perf_counter()
        teacher.score(feats)
        t2 = time.perf_counter()
        pair["rank_int8_paired"][j] = t1 - t0
        pair["rank_teacher_paired"][j] = t2 - t1
    return {name: pct(value) for name, value in {**times, **pair}.items()}


def served_quality(bundles: Path, bundle: Any, cache_dir: Path | None) -> dict[str, Any]:
    """Serve ``bundles`` with ``slimrank serve``; compare every test user's top 10."""
    from slimrank.bundle.formats import read_npy
    from slimrank.evaluation.metrics import ranking_metrics
    from slimrank.pipeline.artifacts import DataArtifact
    from slimrank.ranking.histories import Histories
    from slimrank.serving.client import SlimrankClient

    data = DataArtifact.load(bundle.path / "data")
    truth = data.truth("test")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    user_ids = read_npy(bundle.file("users.npy"))
    item_row = {str(i): r for r, i in enumerate(read_npy(bundle.file("items.npy")))}
    argv = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(bundles)]
    argv += ["--port", "0", "--metrics-port", "-1", "--poll-interval", "0"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = ""
            while proc.stdout is not None and not line.startswith("serving on "):
                line = proc.stdout.readline()
                if not line:
                    log.seek(0)
                    raise SystemExit(f"slimrank serve exited: {log.read()[-2000:]}")
            target = line.split()[2]
            served = np.full((len(users), K), -1, dtype=np.int64)
            by_items = np.full((len(users), K), -1, dtype=np.int64)
            history = Histories.from_matrix(data.seen("test"), data.seen_times("test"))
            item_ids = read_npy(bundle.file("items.npy"))
            with SlimrankClient(target, timeout=10.0) as client:
                for n, u in enumerate(users):
                    got = client.recommend(str(user_ids[u]), K)
                    rows = [item_row[i] for i in got.item_ids]
                    served[n, : len(rows)] = rows
                    # The same user, anonymous, sending their train + valid items oldest first.
                    recent = [str(item_ids[r]) for r in history.row(u)[::-1]]
                    got = client.recommend("", K, recent=recent)
                    rows = [item_row[i] for i in got.item_ids]
                    by_items[n, : len(rows)] = rows
        finally:
            proc.terminate()
            proc.wait(30)
    out: dict[str, Any] = {
        "users": len(users),
        "served_test": ranking_metrics(served, truth[users], (K,)),
        "served_by_recent_items_test": ranking_metrics(by_items, truth[users], (K,)),
        "manifest_int8_test": bundle.manifest.metrics["variants"]["int8"]["test"],
    }
    offline = offline_top(bundle, cache_dir)
    if offline is not None:
        same = sum(
            np.array_equal(served[n], offline[int(u)]) for n, u in enumerate(users) if u in offline
        )
        out["same_top10_as_offline"] = int(same)
    return out


def offline_top(bundle: Any, cache_dir: Path | None) -> dict[int, np.ndarray] | None:
    """Return each test user's offline top 10: the cached test view ranked by the bundle's
    ranker (the pipeline's own evaluation), or None without the step cache."""
    from slimrank.bundle.checksums import sha256_file
    from slimrank.compression.scorer import Scorer
    from slimrank.pipeline.artifacts import load_view
    from slimrank.ranking.pipeline_eval import rank_candidates

    if cache_dir is None:
        return None
    views = sorted(cache_dir.glob("candidates-*/test.safetensors"), key=lambda p: p.stat().st_mtime)
    ranker = bundle.file("ranker.onnx")
    scorer = Scorer(ranker, sha256_file(ranker))
    for path in reversed(views):  # the newest test view whose width the ranker takes
        cands, feats, _ = load_view(path)
        if feats.values.shape[-1] != scorer.input_dim:
            continue
        scores = np.stack([scorer.score(feats.values[i]) for i in range(len(cands))])
        top = rank_candidates(cands.items, scores, K)
        return {int(u): top[i] for i, u in enumerate(cands.user)}
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=DEMO_BUNDLES)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--gap-ms", type=float, default=5.0, help="busy wait between spaced requests (0: none)"
    )
    parser.add_argument("--spaced-calls", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.gap_ms < 0 or args.spaced_calls < 1:
        parser.error(
            f"--gap-ms must be >= 0 and --spaced-calls >= 1 (got {args.gap_ms}, "
            f"{args.spaced_calls})"
        )

    from slimrank.bundle import open_bundle
    from slimrank.bundle.checksums import sha256_file
    from slimrank.compression.scorer import Scorer
    from slimrank.serving.loader import load_snapshot

    load_before = [round(x, 2) for x in os.getloadavg()]
    bundle = open_bundle(args.bundles)
    snapshot = load_snapshot(bundle)
    TEACHER_BUNDLES.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = teacher_onnx(bundle, Path(tmp) / "teacher.onnx")
        teacher = Scorer(onnx_path, sha256_file(onnx_path))
        teacher_version = publish_teacher_bundle(bundle, onnx_path, TEACHER_BUNDLES)
        timed = stages(snapshot, teacher, args.calls)
    spaced = stages(snapshot, None, args.spaced_calls, args.gap_ms / 1000) if args.gap_ms else None
    quality = served_quality(args.bundles, bundle, args.cache_dir)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {cpu_flags()}",
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "bundle": bundle.version,
        "teacher_bundle": f"{TEACHER_BUNDLES.relative_to(ROOT)}/{teacher_version}",
        "candidates": snapshot.n_candidates,
        "features": len(snapshot.featurize.names),
        "calls": args.calls,
        "stages": timed,
        "gap_ms": args.gap_ms,
        "spaced_calls": args.spaced_calls,
        "stages_spaced": spaced,
        "ranker_speedup_p50": round(
            timed["rank_teacher_paired"]["p50_ms"] / timed["rank_int8_paired"]["p50_ms"], 2
        ),
        "quality": quality,
        "command": shlex.join(sys.argv),
    }
    text = markdown(report)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "online_path.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "online_path.md").write_text(text)
    return 0


def markdown(report: dict[str, Any]) -> str:
    q = report["quality"]
    lines = [
        "# The online path on the ml-100k bundle",
        "",
        f"{report['date']} · {report['machine']} · load average before/after "
        f"{report['loadavg_before']} / {report['loadavg_after']} · bundle {report['bundle']}",
        "",
        f"In process, one thread, known users, {report['candidates']} candidates, "
        f"{report['features']} features; {report['calls']} calls; the teacher pair is "
        "timed in its own loop on 300 of those requests' features:",
        "",
        "| stage | p50 ms | p99 ms |",
        "|---|---:|---:|",
    ]
    for name, p in report["stages"].items():
        lines.append(f"| {name} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} |")
    spaced = report.get("stages_spaced")
    if spaced:
        hot = report["stages"]
        lines += [
            "",
            f"The same stages for {report['spaced_calls']} requests, each started "
            f"{report['gap_ms']:g} ms after the previous one ended (a busy wait: the core never "
            "idles), as when requests arrive a couple of hundred per second:",
            "",
            "| stage | p50 ms | p99 ms | p50 / back to back |",
            "|---|---:|---:|---:|",
        ]
        for name, p in spaced.items():
            ratio = p["p50_ms"] / hot[name]["p50_ms"] if hot[name]["p50_ms"] else float("nan")
            lines.append(f"| {name} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | {ratio:.2f}x |")
    lines += [
        "",
        f"Ranker alone: the fp32 teacher (ONNX) takes {report['ranker_speedup_p50']}x the int8 "
        "student's p50 on the same features.",
        "",
        f"Served through `slimrank serve`, {q['users']} test users: test NDCG@10 "
        f"{q['served_test']['ndcg@10']:.4f} (the pipeline's offline int8 evaluation: "
        f"{q['manifest_int8_test']['ndcg@10']:.4f}). The same users sent anonymously with "
        f"their train + valid items as recent items: "
        f"{q['served_by_recent_items_test']['ndcg@10']:.4f}.",
    ]
    if "same_top10_as_offline" in q:
        lines.append(
            f"Users whose served top 10 equals the offline evaluation's, in order: "
            f"{q['same_top10_as_offline']} of {q['users']}."
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
