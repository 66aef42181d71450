"""Cost of a ranker per candidate: parameters, non-zero parameters and FLOPs."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimrank.config import require


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Parameters and dense FLOPs per scored candidate (a multiply-add counts as 2 FLOPs)."""

    params: int
    nonzero_params: int
    flops_per_candidate: int

    def to_dict(self) -> dict[str, int]:
        """Return the fields as a plain dict."""
        return dataclasses.asdict(self)


def count_cost(model: nn.Module, input_dim: int, candidates: int = 8) -> ModelCost:
    """Return the cost of scoring one candidate with ``model``.

    FLOPs come from ``torch.utils.flop_counter`` on a ``(candidates, input_dim)`` batch, divided
    by ``candidates``; so any model built from matmul-like ops (Linear, embedding bags excluded)
    is counted, not only :class:`~slimrank.ranking.mlp.MLPRanker`. Only matmuls count: bias adds
    and activations are a few FLOPs per unit and are left out, as in the usual convention.
    Zeros from unstructured pruning still count as dense FLOPs (``nonzero_params`` shows them).
    """
    require(input_dim > 0, "count_cost", "input_dim", input_dim, "must be positive")
    require(candidates > 0, "count_cost", "candidates", candidates, "must be positive")
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(candidates, input_dim, dtype=dtype)  # (M, F)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops() // candidates
    return ModelCost(params=params, nonzero_params=nonzero, flops_per_candidate=int(flops))


def flops_ratio(
    student: nn.Module, teacher: nn.Module, input_dim: int, teacher_input_dim: int | None = None
) -> float:
    """Return student FLOPs per candidate over teacher FLOPs per candidate (want <= 0.1)."""
    s = count_cost(student, input_dim).flops_per_candidate
    t = count_cost(teacher, teacher_input_dim or input_dim).flops_per_candidate
    require(t > 0, "flops_ratio", "teacher", type(teacher).__name__, "has no counted FLOPs")
    return s / t
