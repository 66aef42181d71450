"""Would another training loss make a better teacher? Listwise losses compared on validation.

Issue 15 needs a stronger teacher. The pipeline's teacher is trained with a listwise softmax
over each user's candidates (``slimrank.ranking.train.listwise_softmax_loss``). This trains the
same teacher (config, seed, training lists, early stop on validation NDCG@10) with other losses
and compares each with the cached teacher on the validation view, paired over users:

- ``softmax``: the pipeline's loss, a control that must give the cached teacher back;
- ``lambda``: softmax plus a pairwise logistic loss over (positive, negative) pairs, each pair
  weighted by how much swapping the two would change NDCG at the current ranking
  (LambdaRank's |delta NDCG|; Burges 2010, Wang et al. 2018 "LambdaLoss");
- ``smoothed``: softmax against targets smoothed toward uniform over the list (eps = 0.1);
- ``approx-ndcg``: a smooth NDCG from sigmoid-approximated ranks (Qin et al. 2010, temperature
  0.1), plus half the softmax to keep early steps stable.

Nothing here reads the test view. Reads the cached steps of ``slimrank pipeline --config
CONFIG`` (after ``make demo``); about 3.5 minutes per loss::

    .venv/bin/python bench/teacher_losses.py [--config pipeline] [--losses softmax lambda ...]

Writes ``bench/results/teacher_losses.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # cached_teacher.py

from cached_teacher import load_cached_teacher, table_row, train_against_cached  # noqa: E402

import slimrank.ranking.train as train_module  # noqa: E402

RESULTS = HERE / "results"
SOFTMAX = train_module.listwise_softmax_loss
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _discounts(n: int) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(n, dtype=torch.float32) + 2.0)


def _ideal_dcg(n_pos: torch.Tensor, n: int, k: int | None = None) -> torch.Tensor:
    """DCG of a perfect list with ``n_pos`` positives (cut at ``k`` if given), per row."""
    cum = torch.cumsum(_discounts(n), 0)
    top = n_pos if k is None else n_pos.clamp_max(k)
    return cum[(top.long() - 1).clamp_min(0)]


def lambda_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax plus a |delta NDCG@10|-weighted pairwise logistic loss (positive over negative)."""
    s = scores.masked_fill(~mask, -1e4)
    pos = (labels > 0) & mask
    neg = ~(labels > 0) & mask
    n = s.shape[1]
    with torch.no_grad():
        order = torch.argsort(s, dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n).expand_as(order))
        disc = _discounts(n)[rank]  # (B, N): each candidate's discount at its current rank
        n_pos = pos.sum(1)
        idcg = _ideal_dcg(n_pos, n, k=10)
        delta = (disc[:, :, None] - disc[:, None, :]).abs() / idcg[:, None, None]
        pairs = pos[:, :, None] & neg[:, None, :]
    margins = s[:, :, None] - s[:, None, :]
    pairwise = (torch.nn.functional.softplus(-margins) * delta * pairs).sum((1, 2))
    keep = n_pos > 0
    per_list = pairwise[keep] / n_pos[keep].clamp_min(1)
    return SOFTMAX(scores, labels, mask) + per_list.mean()


def smoothed_softmax(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, eps: float = 0.1
) -> torch.Tensor:
    """Listwise softmax against targets smoothed toward uniform over the real candidates."""
    log_p = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    log_p = log_p.masked_fill(~mask, 0.0)
    pos = (labels > 0) & mask
    n_pos = pos.sum(1, keepdim=True).clamp_min(1)
    target = (1 - eps) * pos.float() / n_pos + eps * mask.float() / mask.sum(1, keepdim=True)
    keep = pos.any(1)
    return -(target * log_p).sum(1)[keep].mean()


def approx_ndcg(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Minus a smooth NDCG (ranks from sigmoids of score differences) plus half the softmax."""
    s = scores.masked_fill(~mask, -1e4)
    pos = ((labels > 0) & mask).float()
    above = torch.sigmoid((s[:, None, :] - s[:, :, None]) / temperature) * mask[:, None, :]
    approx_rank = 0.5 + above.sum(2)  # 1 + sum over j != i (the i == j term is 0.5)
    dcg = (pos / torch.log2(1.0 + approx_rank)).sum(1)
    n_pos = pos.sum(1)
    keep = n_pos > 0
    ndcg = dcg[keep] / _ideal_dcg(n_pos[keep], s.shape[1])
    return -ndcg.mean() + 0.5 * SOFTMAX(scores, labels, mask)


LOSSES: dict[str, Loss] = {
    "softmax": SOFTMAX,
    "lambda": lambda_loss,
    "smoothed": smoothed_softmax,
    "approx-ndcg": approx_ndcg,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=list(LOSSES))
    parser.add_argument("--out", default="teacher_losses")
    args = parser.parse_args()
    cached = load_cached_teacher(args.config)
    if cached is None:
        return 1
    k = cached.k
    print(f"cached teacher: valid NDCG@{k} {cached.base.mean:.4f}", flush=True)
    rows = []
    for name in args.losses:
        train_module.listwise_softmax_loss = LOSSES[name]  # what train_teacher calls
        try:
            run = train_against_cached(cached, cached.config.teacher)
        finally:
            train_module.listwise_softmax_loss = SOFTMAX
        rows.append(table_row(name, run))
        print(f"{name}: epoch {run.best_epoch}, valid {run.per.mean:.4f}, {run.ci}", flush=True)

    lines = [
        "# Teacher training losses on validation (issue 15)",
        "",
        f"`bench/teacher_losses.py --config {args.config} --losses {' '.join(args.losses)}`. "
        f"The pipeline's teacher config and seed, its training lists, early stop on validation "
        f"NDCG@{k}; pipeline NDCG@{k} on the validation view ({len(cached.base.values)} users), "
        "the interval the row minus the cached teacher, paired over users. Nothing reads test.",
        "",
        f"| loss | chosen epoch | valid NDCG@{k} | minus cached teacher [95% CI] "
        "| valid NDCG by epoch (0 = untrained) | minutes |",
        "|---|---:|---:|---|---|---:|",
        *rows,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote bench/results/{args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
