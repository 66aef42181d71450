"""Pruning that looks at training, not only at the weights: first-order Taylor importance, and
magnitude pruning after an L1 penalty has driven weights towards zero.

- :class:`TaylorPruner`: the importance of a weight is the first-order Taylor estimate of the
  loss change when it is removed, ``|w * dL/dw|`` (Molchanov et al., "Importance Estimation
  for Neural Network Pruning", CVPR 2019, per weight rather than per filter), summed over the
  training steps since the last mask update. Masks follow the same polynomial schedule as
  :class:`~slimrank.compression.pruning.MagnitudePruner`, per layer, and are re-applied after
  every step; a pruned weight is zero, so its importance stays zero and it stays pruned.
- :class:`ThresholdPruner`: one mask, computed by magnitude at ``at_step`` and kept from then
  on. With the loop's L1 penalty (:attr:`~slimrank.compression.fit.FitConfig.l1`) on the
  prunable weights during the epochs before it, the penalty chooses which weights end up
  small and the threshold only reads that choice (L1-driven pruning).

Both implement the loop's :class:`~slimrank.compression.fit.Pruner` protocol; biases and the
output layer are never pruned, as in magnitude pruning.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimrank.compression.pruning import PruningSchedule, magnitude_mask, prunable_layers
from slimrank.config import require

log = logging.getLogger(__name__)


def taylor_mask(importance: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Return a bool mask keeping all but the ``round(sparsity * numel)`` least important
    weights (ties, such as already-pruned zeros, go first in index order)."""
    return magnitude_mask(importance, sparsity)


class TaylorPruner:
    """Gradual pruning by accumulated first-order Taylor importance ``sum_t |w_t * g_t|``."""

    def __init__(self, schedule: PruningSchedule) -> None:
        self.schedule = schedule
        self.masks: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0

    @property
    def end_step(self) -> int:
        """The step at which the final sparsity is reached."""
        return self.schedule.end_step

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """Add ``|w * dL/dw|`` of this step's gradients to each prunable layer's importance."""
        for name, layer in prunable_layers(model, self.schedule.prune_output_layer).items():
            if layer.weight.grad is None:
                continue
            score = (layer.weight * layer.weight.grad).abs()
            if name in self.importance:
                self.importance[name] += score
            else:
                self.importance[name] = score.clone()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Recompute the masks from the importance gathered so far if ``step`` is an update
        step (then start gathering afresh), and apply them in place; return the sparsity.

        Before any gradient was seen (step 0) the weights' magnitude stands in.
        """
        layers = prunable_layers(model, self.schedule.prune_output_layer)
        if self.schedule.should_update(step):
            self.current_sparsity = self.schedule.sparsity(step)
            self.masks = {
                name: taylor_mask(
                    self.importance.get(name, layer.weight.abs()), self.current_sparsity
                )
                for name, layer in layers.items()
            }
            self.importance = {}
        for name, mask in self.masks.items():
            layers[name].weight.mul_(mask)
        return self.current_sparsity


class ThresholdPruner:
    """One magnitude mask at ``final_sparsity``, taken at ``at_step`` and kept afterwards."""

    def __init__(self, final_sparsity: float, at_step: int, include_output: bool = False) -> None:
        require(
            0.0 <= final_sparsity < 1.0,
            "ThresholdPruner",
            "final_sparsity",
            final_sparsity,
            "must be in [0, 1)",
        )
        require(at_step >= 0, "ThresholdPruner", "at_step", at_step, "must be >= 0")
        self.final_sparsity = final_sparsity
        self.at_step = at_step
        self.include_output = include_output
        self.masks: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0

    @property
    def end_step(self) -> int:
        """The step at which the mask is taken (the final sparsity from then on)."""
        return self.at_step

    def observe(self, model: nn.Module) -> None:
        """A threshold needs no gradients: nothing to record."""

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Take the mask at ``at_step`` (once), and apply it in place from then on."""
        layers = prunable_layers(model, self.include_output)
        if step >= self.at_step and not self.masks:
            self.current_sparsity = self.final_sparsity
            self.masks = {
                name: magnitude_mask(layer.weight, self.final_sparsity)
                for name, layer in layers.items()
            }
        for name, mask in self.masks.items():
            layers[name].weight.mul_(mask)
        return self.current_sparsity
