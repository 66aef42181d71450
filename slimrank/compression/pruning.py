"""Unstructured magnitude pruning on TensorFlow Model Optimization's polynomial-decay schedule.

Masks are per Linear weight (biases are never pruned) and per layer: at each update step the
smallest ``sparsity`` fraction of each layer's weights by magnitude is masked. The trainer
re-applies the masks after every optimiser step, so the forward pass always sees masked
weights, and pruned weights stay pruned because their magnitude is then zero. The zeros live
in the weights themselves, so "folding" for export is multiplying once more and dropping the
masks; the exported model is an ordinary dense model with zeros.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from slimrank.config import Config, require

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruningSchedule(Config):
    """``PolynomialDecay`` of tfmot: sparsity rises from ``initial`` to ``final`` by ``power``.

    ``(end_step - begin_step)`` must be a multiple of ``frequency`` so that the last update
    lands on ``end_step`` and the final sparsity is reached.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: float = 3.0
    prune_output_layer: bool = False

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            v = getattr(self, name)
            require(0.0 <= v < 1.0, self, name, v, "must be in [0, 1)")
        require(self.begin_step >= 0, self, "begin_step", self.begin_step, "must be >= 0")
        require(
            self.end_step > self.begin_step, self, "end_step", self.end_step, "must be > begin_step"
        )
        require(self.frequency > 0, self, "frequency", self.frequency, "must be positive")
        require(
            (self.end_step - self.begin_step) % self.frequency == 0,
            self,
            "frequency",
            self.frequency,
            "must divide end_step - begin_step so the final sparsity is reached",
        )
        require(self.power > 0, self, "power", self.power, "must be positive")

    def sparsity(self, step: int) -> float:
        """Return ``final + (initial - final) * (1 - p)^power``, ``p`` the clipped progress."""
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        progress = min(1.0, max(0.0, progress))
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power
        )

    def should_update(self, step: int) -> bool:
        """Return True on the steps where masks are recomputed: every ``frequency`` in range."""
        return (
            self.begin_step <= step <= self.end_step
            and (step - self.begin_step) % self.frequency == 0
        )


def prunable_layers(model: nn.Module, include_output: bool = False) -> dict[str, nn.Linear]:
    """Return the Linear layers to prune by name, in order; the last one only if asked."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not include_output and linears:
        del linears[next(reversed(linears))]
    return linears


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Return a bool mask keeping all but the ``round(sparsity * numel)`` smallest |weights|."""
    n_prune = round(sparsity * weight.numel())
    mask = torch.ones_like(weight, dtype=torch.bool)
    if n_prune > 0:
        # Stable order so that ties (already-pruned zeros) are pruned first and deterministically.
        idx = torch.argsort(weight.detach().abs().flatten(), stable=True)[:n_prune]
        mask.view(-1)[idx] = False
    return mask


class MagnitudePruner:
    """Holds the masks of one gradual pruning run; :meth:`update` is called every step."""

    def __init__(self, schedule: PruningSchedule) -> None:
        self.schedule = schedule
        self.masks: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0

    @property
    def end_step(self) -> int:
        """The step at which the final sparsity is reached."""
        return self.schedule.end_step

    def observe(self, model: nn.Module) -> None:
        """Magnitude needs no gradients: nothing to record."""

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Recompute the masks if ``step`` is an update step, then apply them in place.

        Returns the sparsity the masks currently target.
        """
        layers = prunable_layers(model, self.schedule.prune_output_layer)
        if self.schedule.should_update(step):
            if not self.masks and not self.schedule.prune_output_layer:
                log.info("not pruning the output layer: prune_output_layer=False")
            self.current_sparsity = self.schedule.sparsity(step)
            self.masks = {
                name: magnitude_mask(layer.weight, self.current_sparsity)
                for name, layer in layers.items()
            }
        for name, mask in self.masks.items():
            layers[name].weight.mul_(mask)
        return self.current_sparsity


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, include_output: bool = False) -> nn.Module:
    """Return a copy of ``model`` with each prunable layer pruned once to ``sparsity``."""
    require(0.0 <= sparsity < 1.0, "magnitude_prune", "sparsity", sparsity, "must be in [0, 1)")
    pruned = copy.deepcopy(model)
    if not include_output:
        log.info("not pruning the output layer: include_output=False")
    for layer in prunable_layers(pruned, include_output).values():
        layer.weight.mul_(magnitude_mask(layer.weight, sparsity))
    return pruned


@torch.no_grad()
def fold_masks(model: nn.Module, pruner: MagnitudePruner) -> nn.Module:
    """Return a copy of ``model`` with ``pruner``'s masks multiplied into the weights."""
    folded = copy.deepcopy(model)
    layers = dict(folded.named_modules())
    for name, mask in pruner.masks.items():
        layers[name].weight.mul_(mask)
    return folded


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Return the fraction of zero weights per Linear layer and over all of them (``"all"``)."""
    report: dict[str, float] = {}
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            z = int((m.weight == 0).sum())
            report[name] = z / m.weight.numel()
            zeros += z
            total += m.weight.numel()
    report["all"] = zeros / total if total else 0.0
    return report
