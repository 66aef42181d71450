"""Listwise distillation from teacher scores: the loss, and pseudo labels from the teacher.

Data are lists of candidates per user, padded to ``(B, N, F)`` with a ``(B, N)`` mask that is
True for real candidates. The loss is

    total = soft_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
          + hard_weight * hard

averaged over lists. ``hard`` is, by default, the listwise softmax cross-entropy of the student
scores (temperature 1) against the labels normalised to a distribution over the list (ListNet);
lists without a positive label add no hard loss. It is listwise like the soft term, so both
terms compare scores only within a list, which is all a ranker is used for. ``hard_loss="bce"``
switches to pointwise binary cross-entropy with logits, averaged over real candidates.

Pseudo-label distillation (:func:`pseudo_labels`) replaces the labels with the teacher's hard
top-k per list and drops the soft term. The training loop is :mod:`slimrank.compression.fit`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from slimrank.config import Config, require

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


def pseudo_labels(teacher: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Return ``(B, N)`` 0/1 labels marking the teacher's top ``k`` real candidates per list.

    Pseudo-label distillation trains the student on these hard choices of the teacher (as
    labels of :func:`hard_loss`) instead of its soft score distribution. Pads are never chosen;
    a list with fewer than ``k`` real candidates marks all of them. Ties go to the earlier
    candidate (a stable sort), so the labels are deterministic.
    """
    require(k >= 1, "pseudo_labels", "k", k, "must be >= 1")
    b, n = teacher.shape
    scores = teacher.masked_fill(~mask, float("-inf"))  # (B, N)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : min(k, n)]
    labels = torch.zeros((b, n), dtype=torch.float32)
    labels.scatter_(1, order, 1.0)
    return torch.where(mask, labels, 0.0)


def pseudo_label_config(hard_loss: str = "listwise") -> DistillConfig:
    """Return the loss of pseudo-label distillation: the label term alone, no soft term."""
    return DistillConfig(soft_weight=0.0, hard_weight=1.0, hard_loss=hard_loss)
