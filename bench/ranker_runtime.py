"""Ranker runtime benchmark: which engine serves the ranking MLP fastest on one CPU thread.

For a teacher-sized MLP (256-1024-512-256-1), the shape of the ml-100k pruned student
(256-128-64-1, ~259 features there) and a smaller student (256-64-32-1), scoring one request of
N candidates: torch fp32, torch dynamic int8 (``torch.ao.quantization.quantize_dynamic``),
onnxruntime fp32, ORT dynamic int8 and ORT static int8 (QDQ, per-channel, calibrated). Every
variant runs on one thread (torch ``set_num_threads(1)``, ORT ``intra_op_num_threads=1``).
Calls are interleaved round-robin in a shuffled order each round, so that load from other
processes on a shared machine falls on all variants alike; p50 and p99 are over all calls.
Also reported: FLOPs per candidate, ONNX file size, and the int8 error against fp32 (as a share
of the fp32 scores' std) on the benchmark's random features, with weights trained for a few
steps on a synthetic target so that the scores are not degenerate.

    .venv/bin/python bench/ranker_runtime.py                    # ~1-2 min
    .venv/bin/python bench/ranker_runtime.py --runs 1000 --candidates 200 500

Writes bench/results/ranker_runtime.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.export import export_onnx
from slimrank.compression.flops import count_cost
from slimrank.compression.quantize import (
    QuantConfig,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    torch_dynamic_int8,
)
from slimrank.compression.scorer import Scorer, ScorerConfig
from slimrank.ranking.mlp import MLPConfig, MLPRanker

log = logging.getLogger("bench.ranker_runtime")

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "teacher-size MLP 256-1024-512-256-1": MLPConfig(256, (1024, 512, 256)),
    "pruned-student MLP 256-128-64-1": MLPConfig(256, (128, 64)),
    "student MLP 256-64-32-1": MLPConfig(256, (64, 32)),
}


def _fit(model: MLPRanker, steps: int, seed: int) -> MLPRanker:
    """Train briefly on a smooth synthetic target so scores have a realistic spread."""
    rng = np.random.default_rng(seed)
    dim = model.config.input_dim
    x = torch.from_numpy(rng.normal(size=(2048, dim)).astype(np.float32))  # (M, F)
    w = torch.from_numpy(rng.normal(size=(dim,)).astype(np.float32)) / dim**0.5
    y = torch.sin(x @ w) + 0.5 * (x[:, :4] ** 2).sum(dim=1) / 4  # (M,)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _variants(
    model: MLPRanker, calib: np.ndarray, workdir: Path
) -> dict[str, tuple[Callable[[np.ndarray], np.ndarray], Path | None]]:
    """Return ``name -> (score function (M, F) -> (M,), ONNX file or None)``."""
    dim = model.config.input_dim
    fp32_path = export_onnx(model, workdir / "fp32.onnx", dim)
    dyn_path = quantize_onnx_dynamic(fp32_path, workdir / "dynamic.onnx", QuantConfig())
    static_path = quantize_onnx_static(fp32_path, workdir / "static.onnx", calib, QuantConfig())
    tq = torch_dynamic_int8(model)
    one = ScorerConfig(intra_op_threads=1, inter_op_threads=1)

    def torch_fn(m: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return m(torch.from_numpy(x)).numpy()

        return run

    def ort_fn(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        return Scorer(path, sha256_file(path), one).score

    return {
        "torch fp32": (torch_fn(model), None),
        "torch dynamic int8": (torch_fn(tq), None),
        "ORT fp32": (ort_fn(fp32_path), fp32_path),
        "ORT dynamic int8": (ort_fn(dyn_path), dyn_path),
        "ORT static int8 (QDQ)": (ort_fn(static_path), static_path),
    }


def _interleaved_ms(
    fns: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, runs: int, seed: int
) -> dict[str, np.ndarray]:
    """Return per-variant call times in ms, calls interleaved in a shuffled order each round."""
    names = list(fns)
    for name in names:  # warm-up: allocators, ORT arena, first-call kernels
        for _ in range(20):
            fns[name](x)
    times = {name: np.empty(runs) for name in names}
    order = random.Random(seed)
    for r in range(runs):
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter_ns()
            fns[name](x)
            times[name][r] = (time.perf_counter_ns() - t0) / 1e6
    return times


def run(candidates: list[int], runs: int, seed: int) -> dict:
    """Return the benchmark record (also what is written as JSON)."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    record: dict = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": list(os.getloadavg()),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "quantized_engine": torch.backends.quantized.engine,
        },
        "settings": {"candidates": candidates, "runs": runs, "seed": seed, "threads": 1},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, config in MODELS.items():
            log.info("model %s", model_name)
            model = _fit(MLPRanker(config), steps=150, seed=seed)
            dim = config.input_dim
            calib = rng.normal(size=(2000, dim)).astype(np.float32)  # (M, F)
            workdir = Path(tmp) / model_name.split()[0]
            workdir.mkdir()
            variants = _variants(model, calib, workdir)
            cost = count_cost(model, dim)
            entry: dict = {"config": config.to_dict(), "cost": cost.to_dict(), "by_candidates": {}}
            for n in candidates:
                x = rng.normal(size=(n, dim)).astype(np.float32)  # (N, F): one request
                ref = variants["torch fp32"][0](x)
                fns = {name: fn for name, (fn, _) in variants.items()}
                times = _interleaved_ms(fns, x, runs, seed)
                base = float(np.median(times["torch fp32"]))
                rows = {}
                for name, (fn, path) in variants.items():
                    err = np.abs(fn(x) - ref) / ref.std()
                    p50 = float(np.median(times[name]))
                    rows[name] = {
                        "p50_ms": round(p50, 4),
                        "p99_ms": round(float(np.quantile(times[name], 0.99)), 4),
                        "mean_ms": round(float(times[name].mean()), 4),
                        "speedup_p50_vs_torch_fp32": round(base / p50, 3),
                        # Per round, torch fp32 time over this variant's: robust to load drifts.
                        "speedup_paired_median": round(
                            float(np.median(times["torch fp32"] / times[name])), 3
                        ),
                        "us_per_candidate_p50": round(1000 * p50 / n, 4),
                        "mean_abs_err_over_std": round(float(err.mean()), 5),
                        "max_abs_err_over_std": round(float(err.max()), 5),
                        "onnx_bytes": path.stat().st_size if path else None,
                    }
                    log.info("  N=%d %-22s p50 %.3f ms", n, name, p50)
                entry["by_candidates"][str(n)] = rows
            record["models"][model_name] = entry
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    return record


def markdown(record: dict) -> str:
    """Return the record as Markdown tables, one per model and candidate count."""
    m = record["machine"]
    lines = [
        "# Ranker runtime (one thread)",
        "",
        f"{record['created']}; {m['processor']}, {m['cpu_count']} cores shared with other jobs "
        f"(load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end); "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"{record['settings']['runs']} interleaved calls per variant.",
        "",
        "Reproduce: `.venv/bin/python bench/ranker_runtime.py "
        f"--runs {record['settings']['runs']} --candidates "
        + " ".join(str(c) for c in record["settings"]["candidates"])
        + "`. Errors are |variant - torch fp32| over the std of the fp32 scores.",
        "",
        "How to read: with other jobs on the same cores, absolute times are inflated and p99 is",
        "mostly the scheduler (a call that loses its core waits a time slice, ~10-20 ms). The",
        "variants are interleaved call by call, so the speed-ups, and above all the paired one",
        "(median over rounds of torch-fp32 time / variant time), are the numbers to compare.",
        "",
    ]
    for model_name, entry in record["models"].items():
        cost = entry["cost"]
        for n, rows in entry["by_candidates"].items():
            lines += [
                f"## {model_name}, {n} candidates",
                "",
                f"{cost['params']:,} parameters, {cost['flops_per_candidate']:,} FLOPs per "
                "candidate.",
                "",
                "| variant | p50 ms | p99 ms | speed-up (p50) | speed-up (paired) "
                "| mean err/std | max err/std | ONNX bytes |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, r in rows.items():
                size = f"{r['onnx_bytes']:,}" if r["onnx_bytes"] else "-"
                lines.append(
                    f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                    f"{r['speedup_p50_vs_torch_fp32']:.2f}x | {r['speedup_paired_median']:.2f}x | "
                    f"{r['mean_abs_err_over_std']:.4f} | "
                    f"{r['max_abs_err_over_std']:.4f} | {size} |"
                )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # onnxruntime.quantization logs "consider pre-processing" hints on the root logger.
    logging.getLogger().setLevel(logging.ERROR)
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    record = run(args.candidates, args.runs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranker_runtime.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(record)
    (args.out / "ranker_runtime.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
