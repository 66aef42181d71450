"""The student ranker: a small MLP that scores each candidate's feature vector."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from slimrank.config import Config, require


@dataclasses.dataclass(frozen=True)
class MLPConfig(Config):
    """Shape of an :class:`MLPRanker`: ``input_dim -> hidden[0] -> ... -> 1``."""

    input_dim: int
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require(self.input_dim > 0, self, "input_dim", self.input_dim, "must be positive")
        require(len(self.hidden) > 0, self, "hidden", self.hidden, "needs at least one layer")
        require(
            all(isinstance(h, int) and h > 0 for h in self.hidden),
            self,
            "hidden",
            self.hidden,
            "every width must be a positive int",
        )
        require(0.0 <= self.dropout < 1.0, self, "dropout", self.dropout, "must be in [0, 1)")


class MLPRanker(nn.Module):
    """Score candidates: ``(..., F) -> (...)``, e.g. ``(B, N, F) -> (B, N)`` or ``(M, F) -> (M,)``.

    Layers live in one ``nn.Sequential`` of ``Linear, ReLU[, Dropout]`` blocks ending in a
    ``Linear(h, 1)``, so that pruning and export can walk the Linear layers in order.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        width = config.input_dim
        for h in config.hidden:
            blocks += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout > 0:
                blocks.append(nn.Dropout(config.dropout))
            width = h
        blocks.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return one score per candidate; the last axis of ``features`` is the feature axis."""
        return self.layers(features).squeeze(-1)


def hidden_widths(model: nn.Module) -> tuple[int, ...]:
    """Return the output widths of every Linear layer of ``model`` but the last."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return tuple(m.out_features for m in linears[:-1])


@torch.no_grad()
def fold_standardization(model: MLPRanker, mean: torch.Tensor, std: torch.Tensor) -> MLPRanker:
    """Return a copy of ``model`` for raw features ``x``, ``model`` trained on ``(x - mean) / std``.

    The first Linear layer absorbs the standardization, so it costs nothing at run time:
    ``W' = W / std`` (per input column) and ``b' = b - W' @ mean``; ``mean``, ``std`` are ``(F,)``.
    """
    folded = copy.deepcopy(model)
    first = next(m for m in folded.modules() if isinstance(m, nn.Linear))
    mean = torch.as_tensor(mean, dtype=first.weight.dtype).reshape(-1)  # (F,)
    std = torch.as_tensor(std, dtype=first.weight.dtype).reshape(-1)  # (F,)
    require(
        mean.shape == std.shape == (first.in_features,),
        "fold_standardization",
        "mean/std",
        (tuple(mean.shape), tuple(std.shape)),
        f"must both be ({first.in_features},)",
    )
    require(bool((std > 0).all()), "fold_standardization", "std", "min", "must be > 0")
    first.weight.div_(std)  # (H, F) / (F,)
    first.bias.sub_(first.weight @ mean)
    return folded
