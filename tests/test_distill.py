"""Distillation loss against hand-computed values; a distilled student against its teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimrank.compression.distill import (
    DistillConfig,
    distillation_loss,
    hard_loss,
    pseudo_label_config,
    pseudo_labels,
    soft_loss,
)
from slimrank.compression.fit import TrainConfig, train_student
from slimrank.compression.flops import count_cost, flops_ratio
from slimrank.compression.lists import pad_lists
from slimrank.ranking.mlp import MLPConfig, MLPRanker

# One list of 3 candidates, T = 2. Teacher scores 2*ln(2, 1, 1) give softmax(teacher / T) =
# (0.5, 0.25, 0.25); student scores 0 give softmax = (1/3, 1/3, 1/3).
# KL = 0.5 ln(0.5 / (1/3)) + 2 * 0.25 ln(0.25 / (1/3)) = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.5 ln 1.125
#    = 0.0588915; times T^2 = 4 -> 0.2355661.
# Hard (listwise, label (1, 0, 0)): -ln(1/3) = ln 3 = 1.0986123.
# Total with soft_weight 1, hard_weight 0.5: 0.2355661 + 0.5493061 = 0.7848722.


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEACHER = [2 * math.log(2.0), 0.0, 0.0]
STUDENT = [0.0, 0.0, 0.0]
LABELS = [1.0, 0.0, 0.0]
SOFT, HARD, TOTAL = 0.2355661, 1.0986123, 0.7848722


def _tensors(pad: bool) -> tuple[torch.Tensor, ...]:
    s, t, y, m = list(STUDENT), list(TEACHER), list(LABELS), [True] * 3
    if pad:  # a padded 4th candidate with values that would change every term if counted
        s, t, y, m = [*s, 5.0], [*t, 9.0], [*y, 1.0], [*m, False]
    as_row = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    return as_row(s).requires_grad_(), as_row(t), as_row(y), as_row(m, torch.bool)


@pytest.mark.parametrize("pad", [False, True])
def test_loss_matches_hand_computed_values(pad: bool) -> None:
    s, t, y, m = _tensors(pad)
    loss = distillation_loss(s, t, y, m, DistillConfig(temperature=2.0, hard_weight=0.5))
    assert loss.soft.item() == pytest.approx(SOFT, abs=1e-6)
    assert loss.hard.item() == pytest.approx(HARD, abs=1e-6)
    assert loss.total.item() == pytest.approx(TOTAL, abs=1e-6)
    loss.total.backward()
    assert torch.isfinite(s.grad).all()
    if pad:
        assert s.grad[0, 3].item() == 0.0
        # teacher.teacher_scores marks pads with -inf: same loss, finite gradients.
        t_inf = t.clone()
        t_inf[0, 3] = -torch.inf
        s.grad = None
        again = distillation_loss(s, t_inf, y, m, DistillConfig(temperature=2.0, hard_weight=0.5))
        assert again.total.item() == pytest.approx(TOTAL, abs=1e-6)
        again.total.backward()
        assert torch.isfinite(s.grad).all()


def test_bce_hard_loss_and_soft_loss_zero_when_student_equals_teacher() -> None:
    s, t, y, m = _tensors(pad=True)
    # Student logits 0 -> BCE ln 2 for each of the 3 real candidates.
    assert hard_loss(s, y, m, "bce").item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert soft_loss(t, t, m, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # Softmax ignores a shift: a student equal to teacher + 3 has zero soft loss too.
    assert soft_loss(t + 3.0, t, m, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_list_without_positives_adds_no_hard_loss() -> None:
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = torch.ones(2, 3, dtype=torch.bool)
    assert hard_loss(s, y, m).item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_empty_lists_and_negative_labels_add_nothing() -> None:
    s, t, _, m = _tensors(pad=False)
    # A second list with no real candidate is left out of the soft average, not counted as 0.
    s2, t2, m2 = torch.cat([s, s + 1.0]), torch.cat([t, t * 3.0]), torch.cat([m, ~m])
    assert soft_loss(s2, t2, m2, 2.0).item() == pytest.approx(SOFT, abs=1e-6)
    # A negative label (e.g. -1 for "unlabelled") is clamped to 0, not a negative weight.
    y_neg = torch.tensor([[1.0, -1.0, 0.0]])
    assert hard_loss(s, y_neg, m).item() == pytest.approx(HARD, abs=1e-6)


def test_the_teacher_gets_no_gradient() -> None:
    s, t, y, m = _tensors(pad=False)
    t.requires_grad_()
    loss = distillation_loss(s, t, y, m, DistillConfig(temperature=2.0, hard_weight=0.5))
    loss.total.backward()
    assert t.grad is None
    assert s.grad is not None


def test_pseudo_label_config_is_the_label_term_alone() -> None:
    config = pseudo_label_config()
    assert (config.soft_weight, config.hard_weight, config.hard_loss) == (0.0, 1.0, "listwise")
    assert pseudo_label_config("bce").hard_loss == "bce"
    s, t, y, m = _tensors(pad=True)
    assert distillation_loss(s, t, y, m, config).total.item() == pytest.approx(HARD, abs=1e-6)


def test_pseudo_label_ties_go_to_the_earlier_candidate_in_long_lists() -> None:
    teacher = torch.zeros(2, 40)  # 40 tied scores: more than a small sort keeps in order
    teacher[1, 30] = 1.0
    mask = torch.ones(2, 40, dtype=torch.bool)
    labels = pseudo_labels(teacher, mask, 5)
    assert torch.nonzero(labels[0]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(labels[1]).flatten().tolist() == [0, 1, 2, 3, 30]


def test_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"DistillConfig\.temperature=0"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="hard_loss='mse'"):
        DistillConfig(hard_loss="mse")
    assert DistillConfig.from_dict(DistillConfig().to_dict()) == DistillConfig()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"hidden": ()}, "hidden")],
)
def test_student_config_rejects_bad_shapes_naming_the_field(kwargs: dict, field: str) -> None:
    """A dropout of 1 (every unit dropped) or an MLP with no hidden layer is refused."""
    with pytest.raises(ValueError, match=rf"MLPConfig\.{field}"):
        MLPConfig(4, **kwargs)


def _teacher_lists(seed: int, users: int, cands: int, dim: int):
    torch.manual_seed(seed)
    teacher = MLPRanker(MLPConfig(dim, (128, 64))).eval()
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(cands - (u % 7), dim)).astype(np.float32) for u in range(users)]
    with torch.no_grad():
        scores = [teacher(torch.from_numpy(x)).numpy() for x in feats]
    labels = [(s >= np.sort(s)[-5]).astype(np.float32) for s in scores]  # teacher's top-5
    return teacher, pad_lists(feats, scores, labels)


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_distilled_student_ranks_like_teacher() -> None:
    dim = 12
    teacher, data = _teacher_lists(seed=0, users=60, cands=50, dim=dim)
    train, held = data.subset(torch.arange(50)), data.subset(torch.arange(50, 60))
    torch.manual_seed(1)
    student = MLPRanker(MLPConfig(dim, (32, 16)))
    before = [p.clone() for p in student.parameters()]
    # Soft term only: the question here is whether the student reproduces the teacher's order
    # on held-out lists (with 50 lists, the top-5 hard labels mostly teach it to overfit).
    result = train_student(
        student,
        train,
        DistillConfig(temperature=1.0, hard_weight=0.0),
        TrainConfig(epochs=100, batch_size=10, lr=1e-2),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert result.epoch_loss[-1] < 0.1 * result.epoch_loss[0]
    with torch.no_grad():
        s_after = result.model(held.features)  # (B, N)
        s_before = student(held.features)
    corr = lambda s: np.mean(  # noqa: E731
        [_rank_corr(s[i][held.mask[i]], held.teacher_scores[i][held.mask[i]]) for i in range(10)]
    )
    assert corr(s_after) > 0.85  # 0.92 measured
    assert corr(s_after) > corr(s_before) + 0.2
    # The student costs under a tenth of the teacher per candidate.
    assert flops_ratio(result.model, teacher, dim) < 0.1


def test_flops_counter_matches_hand_count() -> None:
    model = MLPRanker(MLPConfig(20, (64, 32)))
    cost = count_cost(model, 20)
    assert cost.flops_per_candidate == 2 * (20 * 64 + 64 * 32 + 32 * 1)
    assert cost.params == (20 * 64 + 64) + (64 * 32 + 32) + (32 + 1)
    teacher = MLPRanker(MLPConfig(256, (1024, 512, 256)))
    student = MLPRanker(MLPConfig(256, (64, 32)))
    assert flops_ratio(student, teacher, 256) == pytest.approx(
        (256 * 64 + 64 * 32 + 32) / (256 * 1024 + 1024 * 512 + 512 * 256 + 256)
    )
    # (B, N, F) input gives (B, N) scores.
    assert model(torch.zeros(3, 7, 20)).shape == (3, 7)
    assert model(torch.zeros(7, 20)).shape == (7,)


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(-5, 5), min_size=2, max_size=8),
    noise=st.lists(st.floats(-5, 5), min_size=8, max_size=8),
    shift=st.floats(-10, 10),
    temperature=st.floats(0.5, 4.0),
    n_pad=st.integers(0, 3),
)
def test_soft_loss_properties(scores, noise, shift, temperature, n_pad) -> None:
    """KL >= 0, 0 iff equal up to a shift, and padded candidates never count."""
    n = len(scores)
    teacher = torch.tensor([scores + [0.0] * n_pad])
    student = torch.tensor([noise[:n] + [99.0] * n_pad])
    mask = torch.tensor([[True] * n + [False] * n_pad])
    loss = soft_loss(student, teacher, mask, temperature)
    unpadded = soft_loss(student[:, :n], teacher[:, :n], mask[:, :n], temperature)
    assert loss.item() >= -1e-6
    assert loss.item() == pytest.approx(unpadded.item(), rel=1e-5, abs=1e-6)
    assert soft_loss(teacher + shift, teacher, mask, temperature).item() == pytest.approx(
        0.0, abs=1e-5
    )
