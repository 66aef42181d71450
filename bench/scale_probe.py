"""Probes of the steps that do not fit at 1M users x 1M items, without running the pipeline.

``two-tower``: the scale config's two-tower (``configs/scale.toml``: id + history tables,
d = 63 + bias, in-batch sampled softmax) built for ``--users`` x ``--items``, timed over a few
training steps on random users' histories: the forward/backward and the optimizer update
apart, for ``--optimizer`` (``adamw``: dense AdamW; ``sparse_adam``: sparse embedding
gradients + SparseAdam, :func:`slimrank.retrieval.train.make_optimizer`). Prints one JSON
line per batch size and appends it to ``bench/results/scale_probe.json``.

    nice -n 10 .venv/bin/python bench/scale_probe.py --users 100000 --items 100000 \
        --optimizer sparse_adam
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def probe_two_tower(
    users: int,
    items: int,
    batch: int,
    steps: int,
    history: int,
    optimizer: str = "adamw",
    threads: int = 1,
) -> dict:
    import dataclasses

    from slimrank.pipeline.config import PipelineConfig
    from slimrank.retrieval.train import make_optimizer, sampled_softmax_loss
    from slimrank.retrieval.two_tower import TwoTower, TwoTowerConfig

    with open(ROOT / "configs" / "scale.toml", "rb") as f:
        step = PipelineConfig.from_dict(tomllib.load(f)).two_tower
    torch.set_num_threads(threads)
    config = TwoTowerConfig(
        n_users=users,
        n_items=items,
        dim=step.dim,
        id_dim=step.id_dim,
        hidden=step.hidden,
        use_history=step.use_history,
        projection=step.projection,
        normalize=step.normalize,
        item_bias=step.item_bias,
        history_power=step.history_power,
        init_std=step.init_std,
        temperature=step.temperature,
    )
    model = TwoTower(config)
    params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(
        model, dataclasses.replace(step.train, optimizer=optimizer, weight_decay=0.0)
    )
    rng = np.random.default_rng(0)
    fwd, upd, wall = [], [], []
    for _ in range(steps + 1):  # the first step allocates the optimizer's state: not timed
        user = torch.as_tensor(rng.integers(0, users, batch))
        item = torch.as_tensor(rng.integers(0, items, batch))
        bag = torch.as_tensor(rng.integers(0, items, batch * history))
        offsets = torch.arange(0, batch * history, history)
        w0, t0 = time.perf_counter(), time.process_time()
        sums, counts = model.user_tower.pool(bag, offsets)
        pooled = model.pool_scale(sums, counts.to(sums.dtype))
        u = model.user_vectors_pooled(user, None, pooled)
        v = model.item_vectors(item, None)
        loss = sampled_softmax_loss(model.logits(u, v, item), item, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.process_time()
        opt.step()
        t2, w2 = time.process_time(), time.perf_counter()
        wall.append(w2 - w0)
        fwd.append(t1 - t0)
        upd.append(t2 - t1)
    fwd_s, upd_s = float(np.median(fwd[1:])), float(np.median(upd[1:]))
    return {
        "probe": "two-tower step",
        "users": users,
        "items": items,
        "batch": batch,
        "parameters": params,
        "optimizer": optimizer,
        "threads": threads,
        "step_wall_s": round(float(np.median(wall[1:])), 3),
        "forward_backward_cpu_s": round(fwd_s, 3),
        "update_cpu_s": round(upd_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--history", type=int, default=16, help="history items per example")
    parser.add_argument("--optimizer", choices=("adamw", "sparse_adam"), default="adamw")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch threads; each is probed"
    )
    args = parser.parse_args()
    out = ROOT / "bench" / "results" / "scale_probe.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for batch, threads in itertools.product(args.batches, args.threads):
        row = probe_two_tower(
            args.users, args.items, batch, args.steps, args.history, args.optimizer, threads
        )
        row["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(json.dumps(row), flush=True)
        rows.append(row)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
