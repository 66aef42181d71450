"""Two-tower training at scale: dense AdamW against sparse gradients + SparseAdam, side by side.

One synthetic world (``slimrank data generate world``'s writer, cached in ``bench/.cache/scale``
with ``bench/scale_steps.py``'s worlds), the data step of ``configs/scale.toml`` on it, then the
scale config's two-tower trained once per optimizer in this one process, with the same seed,
data and epochs. Per optimizer: CPU seconds of each epoch's training passes (validation
excluded), peak RSS, and the validation / test Recall@10 and NDCG@10 of the best epoch
(full ranking on the config's ``eval_users`` sample). Writes
``bench/results/two_tower_optimizers.{json,md}``.

    nice -n 10 .venv/bin/python bench/two_tower_optimizers.py --users 100000 --items 100000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "scale"
RESULTS = ROOT / "bench" / "results"


class _DataDone(Exception):
    """Raised by the hook once the data step has its output."""


def data_dir_for(config: Any) -> Path:
    """Run (or take from the step cache) the data step of ``config``; return its directory."""
    from slimrank.pipeline.run import run_pipeline

    found: dict[str, Path] = {}

    def hook(name: str, output: Any, seconds: float | None) -> None:
        if name == "data" and output is not None:
            found["data"] = output.path
            raise _DataDone

    with contextlib.suppress(_DataDone):
        run_pipeline(config, hook)
    return found["data"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(step: Any, data: Any, k: int) -> dict[str, Any]:
    """Train ``step``'s two-tower on ``data``; return its times, memory and metrics."""
    from slimrank.pipeline.steps import two_tower_model_config
    from slimrank.retrieval.train import evaluate_model, train_two_tower

    reset_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train_two_tower(
        two_tower_model_config(step, data),
        step.train,
        data.split,
        data.user_features,
        data.item_features,
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    metrics = {
        view: evaluate_model(
            result.model,
            data.split,
            view,
            data.user_features,
            data.item_features,
            ks=(k,),
            max_users=step.train.eval_users,
        )
        for view in ("valid", "test")
    }
    epochs = list(result.epoch_cpu_seconds)
    return {
        "optimizer": step.train.optimizer,
        "epochs": len(epochs),
        "epoch_cpu_s": [round(s, 1) for s in epochs],
        "mean_epoch_cpu_s": round(sum(epochs) / len(epochs), 1),
        "train_cpu_s": round(cpu, 1),
        "train_wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "best_epoch": result.best_epoch,
        "log": result.log,
        "valid": metrics["valid"],
        "test": metrics["test"],
    }


def render(result: dict[str, Any]) -> str:
    w, k = result["world"], result["k"]
    lines = [
        "# Two-tower training: dense AdamW vs sparse gradients + SparseAdam",
        "",
        f"`bench/two_tower_optimizers.py` on a synthetic world of {w['users']:,} users, "
        f"{w['items']:,} items, {w['interactions']:,} interactions ({result['date']}): the "
        "two-tower of `configs/scale.toml` (id + history tables, d = 63 + bias, in-batch "
        f"sampled softmax, batch {result['batch_size']}, {result['epochs']} epochs), trained once "
        "per optimizer in one process with the same seed and data. Epoch CPU s: the training "
        "passes only (validation excluded); metrics: full ranking of the best epoch's model on "
        f"{result['eval_users']:,} sampled users. The machine was shared (load average "
        f"{result['load_average']:.1f} at the end); CPU seconds are the measure.",
        "",
        f"| optimizer | epoch CPU s (mean) | train wall s | peak RSS MiB | best epoch "
        f"| valid recall@{k} | valid NDCG@{k} | test recall@{k} | test NDCG@{k} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['optimizer']} | {r['mean_epoch_cpu_s']:,.1f} | {r['train_wall_s']:,.0f} "
            f"| {r['peak_rss_mb']:,} | {r['best_epoch']} "
            f"| {r['valid'][f'recall@{k}']:.4f} | {r['valid'][f'ndcg@{k}']:.4f} "
            f"| {r['test'][f'recall@{k}']:.4f} | {r['test'][f'ndcg@{k}']:.4f} |"
        )
    lines.append("")
    lines.append("Validation Recall@10 per epoch:")
    lines.append("")
    for r in result["runs"]:
        per = ", ".join(f"{e[f'recall@{k}']:.4f}" for e in r["log"])
        lines.append(f"- {r['optimizer']}: {per} (epoch CPU s {r['epoch_cpu_s']})")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    import logging
    import os

    from slimrank.data.world import WorldConfig, write_world
    from slimrank.pipeline.artifacts import DataArtifact
    from slimrank.pipeline.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--per-user", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=0, help="0: the config's")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sparse_adam"])
    parser.add_argument("--config", default=str(ROOT / "configs" / "scale.toml"))
    parser.add_argument("--name", default="two_tower_optimizers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("slimrank").setLevel(logging.INFO)

    name = f"{args.users}u-{args.items}i-{args.per_user:g}"
    world_dir = CACHE / f"world-{name}"
    if not (world_dir / "world.json").exists():
        write_world(
            WorldConfig(
                n_users=args.users, n_items=args.items, per_user=args.per_user, seed=args.seed
            ),
            world_dir,
        )
    config = load_config(args.config)
    config = dataclasses.replace(
        config,
        cache_dir=str(CACHE / f"cache-{name}"),
        data=dataclasses.replace(config.data, source=str(world_dir)),
    )
    data = DataArtifact.load(data_dir_for(config))
    runs = []
    for optimizer in args.optimizers:
        train = dataclasses.replace(
            config.two_tower.train,
            optimizer=optimizer,
            epochs=args.epochs or config.two_tower.train.epochs,
        )
        step = dataclasses.replace(config.two_tower, train=train)
        run = measure(step, data, config.k)
        print(json.dumps({k: v for k, v in run.items() if k != "log"}), flush=True)
        runs.append(run)
    counts = json.loads((world_dir / "world.json").read_text())["counts"]
    result = {
        "world": counts,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "k": config.k,
        "batch_size": config.two_tower.train.batch_size,
        "epochs": args.epochs or config.two_tower.train.epochs,
        "eval_users": config.two_tower.train.eval_users,
        "load_average": os.getloadavg()[0],
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
