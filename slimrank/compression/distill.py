"""Listwise distillation from teacher scores, and the loop that trains a student with it.

Data are lists of candidates per user, padded to ``(B, N, F)`` with a ``(B, N)`` mask that is
True for real candidates. The loss is

    total = soft_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
          + hard_weight * hard

averaged over lists. ``hard`` is, by default, the listwise softmax cross-entropy of the student
scores (temperature 1) against the labels normalised to a distribution over the list (ListNet);
lists without a positive label add no hard loss. It is listwise like the soft term, so both
terms compare scores only within a list, which is all a ranker is used for. ``hard_loss="bce"``
switches to pointwise binary cross-entropy with logits, averaged over real candidates.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimrank.config import Config, require

if TYPE_CHECKING:
    from slimrank.compression.pruning import MagnitudePruner

log = logging.getLogger(__name__)

# Logit given to padded candidates: finite, so masked terms are 0 * finite rather than 0 * inf.
_PAD_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """Weights and temperature of the distillation loss."""

    temperature: float = 2.0
    soft_weight: float = 1.0
    hard_weight: float = 0.5
    hard_loss: str = "listwise"

    def __post_init__(self) -> None:
        require(self.temperature > 0, self, "temperature", self.temperature, "must be > 0")
        require(self.soft_weight >= 0, self, "soft_weight", self.soft_weight, "must be >= 0")
        require(self.hard_weight >= 0, self, "hard_weight", self.hard_weight, "must be >= 0")
        require(
            self.hard_loss in ("listwise", "bce"),
            self,
            "hard_loss",
            self.hard_loss,
            "must be 'listwise' or 'bce'",
        )


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """The total loss and its two terms (scalar tensors; ``total`` carries the graph)."""

    total: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor


def _masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(scores.masked_fill(~mask, _PAD_LOGIT), dim=-1)  # (B, N)


def soft_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over lists.

    ``student``, ``teacher`` and ``mask`` are ``(B, N)``; lists with no real candidate are
    left out of the average.
    """
    log_p_t = _masked_log_softmax(teacher / temperature, mask)  # (B, N)
    log_p_s = _masked_log_softmax(student / temperature, mask)  # (B, N)
    terms = torch.where(mask, log_p_t.exp() * (log_p_t - log_p_s), 0.0)  # (B, N)
    has_any = mask.any(dim=-1)  # (B,)
    per_list = terms.sum(dim=-1)[has_any]
    if per_list.numel() == 0:
        return student.sum() * 0.0
    return temperature**2 * per_list.mean()


def hard_loss(
    student: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, kind: str = "listwise"
) -> torch.Tensor:
    """Return the label loss of ``student`` scores, ``(B, N)`` each (see the module docstring)."""
    labels = labels.to(student.dtype)
    if kind == "bce":
        per_item = F.binary_cross_entropy_with_logits(student, labels, reduction="none")
        n_real = mask.sum()
        if n_real == 0:
            return student.sum() * 0.0
        return torch.where(mask, per_item, 0.0).sum() / n_real
    require(kind == "listwise", "hard_loss", "kind", kind, "must be 'listwise' or 'bce'")
    labels = torch.where(mask, labels.clamp_min(0.0), 0.0)  # (B, N)
    total = labels.sum(dim=-1, keepdim=True)  # (B, 1)
    has_pos = total.squeeze(-1) > 0  # (B,)
    if not bool(has_pos.any()):
        return student.sum() * 0.0
    target = labels / total.clamp_min(1e-12)  # (B, N)
    log_p_s = _masked_log_softmax(student, mask)  # (B, N)
    per_list = -torch.where(mask, target * log_p_s, 0.0).sum(dim=-1)  # (B,)
    return per_list[has_pos].mean()


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    config: DistillConfig,
) -> DistillLoss:
    """Return the weighted soft + hard loss of ``(B, N)`` student scores."""
    teacher = teacher.detach()
    soft = soft_loss(student, teacher, mask, config.temperature)
    hard = hard_loss(student, labels, mask, config.hard_loss)
    total = config.soft_weight * soft + config.hard_weight * hard
    return DistillLoss(total=total, soft=soft, hard=hard)


@dataclasses.dataclass(frozen=True)
class ListData:
    """Candidate lists padded to one length: features ``(B, N, F)``, the rest ``(B, N)``."""

    features: torch.Tensor
    teacher_scores: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        b, n, _ = self.features.shape
        for name in ("teacher_scores", "labels", "mask"):
            shape = tuple(getattr(self, name).shape)
            require(shape == (b, n), self, name, shape, f"must have shape {(b, n)}")
        require(self.mask.dtype == torch.bool, self, "mask", self.mask.dtype, "must be bool")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: torch.Tensor) -> ListData:
        """Return the lists at ``index``."""
        return ListData(
            self.features[index], self.teacher_scores[index], self.labels[index], self.mask[index]
        )


def pad_lists(
    features: Sequence[np.ndarray],
    teacher_scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
) -> ListData:
    """Return :class:`ListData` from per-user arrays ``(N_u, F)`` and ``(N_u,)``, zero-padded."""
    require(len(features) > 0, "pad_lists", "features", len(features), "needs at least one list")
    require(
        len(teacher_scores) == len(features),
        "pad_lists",
        "teacher_scores",
        len(teacher_scores),
        f"must hold one array per list ({len(features)})",
    )
    if labels is None:
        labels = [np.zeros(len(x), dtype=np.float32) for x in features]
    n = max(len(x) for x in features)
    dim = features[0].shape[1]
    b = len(features)
    feats = np.zeros((b, n, dim), dtype=np.float32)  # (B, N, F)
    teach = np.zeros((b, n), dtype=np.float32)  # (B, N)
    labs = np.zeros((b, n), dtype=np.float32)  # (B, N)
    mask = np.zeros((b, n), dtype=bool)  # (B, N)
    for i, (x, t, y) in enumerate(zip(features, teacher_scores, labels, strict=True)):
        m = len(x)
        require(
            len(t) == m and len(y) == m, "pad_lists", "list", i, "needs one score per candidate"
        )
        feats[i, :m], teach[i, :m], labs[i, :m], mask[i, :m] = x, t, y, True
    return ListData(
        torch.from_numpy(feats),
        torch.from_numpy(teach),
        torch.from_numpy(labs),
        torch.from_numpy(mask),
    )


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
    pruner: MagnitudePruner | None = None,
    start_step: int = 0,
) -> TrainResult:
    """Return a copy of ``student`` trained to match ``data.teacher_scores`` (the input is kept).

    The same loop fine-tunes a pruned student: pass a structurally pruned model, or a
    ``pruner`` whose masks are updated on its schedule and re-applied after every step.
    ``start_step`` continues that schedule from an earlier call (one call per epoch);
    ``TrainResult.steps`` is then the step reached, ``start_step`` included.
    """
    require(start_step >= 0, "train_student", "start_step", start_step, "must be >= 0")
    generator = torch.Generator().manual_seed(train.seed)
    model = copy.deepcopy(student)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    step = start_step
    if pruner is not None:
        pruner.update(model, step)
    epoch_loss: list[float] = []
    for epoch in range(train.epochs):
        order = torch.randperm(len(data), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(data), train.batch_size):
            batch = data.subset(order[start : start + train.batch_size])
            scores = model(batch.features)  # (b, N)
            loss = distillation_loss(
                scores, batch.teacher_scores, batch.labels, batch.mask, distill
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            step += 1
            if pruner is not None:
                pruner.update(model, step)
            total += float(loss.total.detach())
            batches += 1
        epoch_loss.append(total / batches)
        log.debug("epoch %d loss %.5f", epoch, epoch_loss[-1])
    model.eval()
    return TrainResult(model=model, epoch_loss=tuple(epoch_loss), steps=step)
