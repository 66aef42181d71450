"""The one student training loop: an epoch over mini-batches of lists, and the fit around it.

:func:`train_epoch` is the only place a student takes optimiser steps. :func:`train_student`
(a fixed number of epochs, one optimizer) and :func:`fit_epochs` (one epoch at a time, the
epoch chosen on a validation metric) both call it; so do the pipeline's local engine and, with
each global batch split over the workers (:class:`Shard`), its Ray Train workers.

Optional parts of a step, all applied inside :func:`train_epoch`:

- a *pruner* (:class:`~slimrank.compression.pruning.MagnitudePruner` or
  :class:`~slimrank.compression.gradient_pruning.TaylorPruner`) whose masks are updated on its
  schedule and re-applied after every step;
- an *L1 penalty* on the prunable weights, added to the loss (see
  :mod:`slimrank.compression.gradient_pruning`);
- *pseudo labels* live in the data: :func:`~slimrank.compression.distill.pseudo_labels`
  replaces ``ListData.labels`` before training.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

from slimrank.compression.distill import DistillConfig, distillation_loss
from slimrank.compression.lists import ListData
from slimrank.config import Config, require

log = logging.getLogger(__name__)

# A student's validation metric (higher is better); picklable when it closes over arrays only.
Metric = Callable[[nn.Module], float]


class Pruner(Protocol):
    """What the loop needs of a pruner: update (and apply) masks at a step, its schedule end."""

    current_sparsity: float

    def observe(self, model: nn.Module) -> None:
        """See the gradients of the step about to be taken (gradient-based importance)."""
        ...

    def update(self, model: nn.Module, step: int) -> float:
        """Recompute the masks if ``step`` is an update step; apply them in place."""
        ...

    @property
    def end_step(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Optimiser settings of :func:`train_student` (Adam over mini-batches of lists)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs > 0, self, "epochs", self.epochs, "must be positive")
        require(self.batch_size > 0, self, "batch_size", self.batch_size, "must be positive")
        require(self.lr > 0, self, "lr", self.lr, "must be positive")
        require(self.weight_decay >= 0, self, "weight_decay", self.weight_decay, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class FitConfig(Config):
    """:func:`fit_epochs`: at most ``epochs`` epochs, stopping after ``patience`` epochs
    without a better validation metric (0: train every epoch, keep the last).

    ``l1``: weight of the L1 penalty on the prunable weights (0: none).
    """

    epochs: int = 20
    patience: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    l1: float = 0.0

    def __post_init__(self) -> None:
        require(self.epochs >= 1, self, "epochs", self.epochs, "must be >= 1")
        require(self.patience >= 0, self, "patience", self.patience, "must be >= 0")
        require(self.batch_size > 0, self, "batch_size", self.batch_size, "must be positive")
        require(self.lr > 0, self, "lr", self.lr, "must be positive")
        require(self.l1 >= 0, self, "l1", self.l1, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This worker's share of every global batch: part ``rank`` of ``world`` equal parts."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        require(self.world >= 1, "Shard", "world", self.world, "must be >= 1")
        require(0 <= self.rank < self.world, "Shard", "rank", self.rank, f"in [0, {self.world})")


@dataclasses.dataclass(frozen=True)
class EpochResult:
    """Sum of the batch losses, the number of batches, and the step reached."""

    loss_sum: float
    batches: int
    step: int


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Return the sum of |w| over the prunable Linear weights (the output layer excluded)."""
    from slimrank.compression.pruning import prunable_layers

    layers = prunable_layers(model)
    if not layers:
        return torch.zeros(())
    return sum(layer.weight.abs().sum() for layer in layers.values())  # type: ignore[return-value]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ListData,
    loss: DistillConfig,
    batch_size: int,
    generator: torch.Generator,
    pruner: Pruner | None = None,
    step: int = 0,
    shard: Shard = Shard(),
    l1: float = 0.0,
    core: nn.Module | None = None,
) -> EpochResult:
    """Train ``model`` in place for one epoch in a shuffled order drawn from ``generator``.

    Each global batch of ``batch_size`` lists is split into ``shard.world`` parts and this
    worker trains on part ``shard.rank`` (DDP averages the gradients); with one worker that is
    the whole batch. ``core`` is the module a pruner and the penalty see (the DDP wrapper's
    ``module``; default ``model``). The loss sum covers this worker's batches only.
    """
    core = model if core is None else core
    order = torch.randperm(len(data), generator=generator)
    model.train()
    total, batches = 0.0, 0
    for start in range(0, len(data), batch_size):
        mine = order[start : start + batch_size]
        if shard.world > 1:
            mine = mine.tensor_split(shard.world)[shard.rank]
        batch = data.subset(mine)
        scores = model(batch.features)  # (b, N)
        terms = distillation_loss(scores, batch.teacher_scores, batch.labels, batch.mask, loss)
        objective = terms.total + l1 * l1_penalty(core) if l1 > 0 else terms.total
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if pruner is not None:
            pruner.observe(core)  # gradient-based importance, before the step changes weights
        optimizer.step()
        step += 1
        if pruner is not None:
            pruner.update(core, step)
        total += float(terms.total.detach())
        batches += 1
    return EpochResult(total, batches, step)


def _adam(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A trained copy of the student, the mean loss of each epoch and the step reached."""

    model: nn.Module
    epoch_loss: tuple[float, ...]
    steps: int


def train_student(
    student: nn.Module,
    data: ListData,
    distill: DistillConfig,
    train: TrainConfig,
    pruner: Pruner | None = None,
    start_step: int = 0,
) -> TrainResult:
    """Return a copy of ``student`` trained for ``train.epochs`` epochs (the input is kept).

    The same loop fine-tunes a pruned student: pass a structurally pruned model, or a
    ``pruner`` whose masks are updated on its schedule and re-applied after every step.
    ``start_step`` continues that schedule from an earlier call; ``TrainResult.steps`` is then
    the step reached, ``start_step`` included.
    """
    require(start_step >= 0, "train_student", "start_step", start_step, "must be >= 0")
    generator = torch.Generator().manual_seed(train.seed)
    model = copy.deepcopy(student)
    model.train()
    optimizer = _adam(model, train.lr, train.weight_decay)
    step = start_step
    if pruner is not None:
        pruner.update(model, step)
    epoch_loss: list[float] = []
    for epoch in range(train.epochs):
        result = train_epoch(
            model, optimizer, data, distill, train.batch_size, generator, pruner, step
        )
        step = result.step
        epoch_loss.append(result.loss_sum / result.batches)
        log.debug("epoch %d loss %.5f", epoch, epoch_loss[-1])
    model.eval()
    return TrainResult(model=model, epoch_loss=tuple(epoch_loss), steps=step)


def state_arrays(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of ``model``'s state dict (a snapshot later steps do not touch)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The state of the chosen epoch's student, its metric, and every epoch's record."""

    state: dict[str, torch.Tensor]
    best_metric: float
    history: list[dict[str, float]]


# Sums (loss, batches) over the workers; the identity on one worker.
Reduce = Callable[[float, int], tuple[float, int]]


def fit_epochs(
    model: nn.Module,
    data: ListData,
    loss: DistillConfig,
    config: FitConfig,
    metric: Metric,
    pruner: Pruner | None = None,
    shard: Shard = Shard(),
    core: nn.Module | None = None,
    reduce: Reduce | None = None,
) -> FitResult:
    """Train ``model`` in place epoch by epoch and return the state of the best epoch.

    Every epoch starts a fresh Adam and shuffles with seed ``config.seed + epoch``; after it,
    ``metric(core)`` scores the student and the run stops after ``config.patience`` epochs
    without a better one (``patience=0``: every epoch, the last kept). With a ``pruner``, its
    schedule runs on across epochs and only epochs that end at the final sparsity compete (an
    epoch halfway up the ramp is denser than what is served); if none does, the last epoch is
    returned. ``shard``, ``core`` and ``reduce`` make it a data-parallel worker (Ray Train):
    every worker takes the same decisions because they hold the same weights.
    """
    core = model if core is None else core
    best_state, best_metric, stale = state_arrays(core), -np.inf, 0
    step = 0
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        optimizer = _adam(model, config.lr, config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed + epoch)
        if pruner is not None:
            pruner.update(core, step)
        result = train_epoch(
            model,
            optimizer,
            data,
            loss,
            config.batch_size,
            generator,
            pruner,
            step,
            shard,
            config.l1,
            core,
        )
        step = result.step
        total, batches = result.loss_sum, result.batches
        if reduce is not None:
            total, batches = reduce(total, batches)
        core.eval()
        value = float(metric(core))
        record: dict[str, float] = {"epoch": epoch + 1, "loss": total / batches, "valid": value}
        if pruner is not None:
            record["sparsity"] = pruner.current_sparsity
        if shard.world > 1:
            record["workers"] = shard.world
        history.append(record)
        log.info("student epoch %d/%d: %s", epoch + 1, config.epochs, record)
        if pruner is not None and step < pruner.end_step:
            best_state = state_arrays(core)  # still pruning: the fallback if no epoch competes
            continue
        if value > best_metric or config.patience == 0:
            best_state, best_metric, stale = state_arrays(core), value, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return FitResult(best_state, float(best_metric), history)


def fit_on_valid(
    student: nn.Module,
    data: ListData,
    loss: DistillConfig,
    config: FitConfig,
    metric: Metric,
    pruner: Pruner | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Return a copy of ``student`` from the best validation epoch (:func:`fit_epochs`), and
    every epoch's record (the input is kept)."""
    model = copy.deepcopy(student)
    result = fit_epochs(model, data, loss, config, metric, pruner)
    model.load_state_dict(result.state)
    return model.eval(), result.history
