"""The student ranker: a small MLP that scores each candidate's feature vector."""

from __future__ import annotations

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
