"""Pruning: schedule values by hand, masks during training, structured pruning equivalences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimrank.compression.distill import DistillConfig, soft_loss
from slimrank.compression.fit import TrainConfig, train_student
from slimrank.compression.flops import count_cost
from slimrank.compression.lists import pad_lists
from slimrank.compression.pruning import (
    MagnitudePruner,
    PruningSchedule,
    fold_masks,
    magnitude_mask,
    magnitude_prune,
    sparsity_report,
)
from slimrank.compression.structured import prune_units, shrink_units, unit_scores
from slimrank.ranking.mlp import MLPConfig, MLPRanker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SCHEDULE = PruningSchedule(
    initial_sparsity=0.0, final_sparsity=0.8, begin_step=100, end_step=500, frequency=100
)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # before begin: the initial sparsity
        (100, 0.0),
        (200, 0.8 * (1 - 0.75**3)),  # 0.4625
        (250, 0.8 * (1 - 0.625**3)),  # 0.6046875
        (300, 0.8 * (1 - 0.5**3)),  # 0.7
        (400, 0.8 * (1 - 0.25**3)),  # 0.7875
        (500, 0.8),
        (900, 0.8),  # after end: the final sparsity
    ],
)
def test_polynomial_decay_values(step: int, expected: float) -> None:
    assert SCHEDULE.sparsity(step) == pytest.approx(expected, abs=1e-12)


def test_hand_values_written_out() -> None:
    assert SCHEDULE.sparsity(200) == pytest.approx(0.4625)
    assert SCHEDULE.sparsity(300) == pytest.approx(0.7)
    assert SCHEDULE.sparsity(400) == pytest.approx(0.7875)


def test_updates_only_every_frequency_steps_in_range() -> None:
    updates = [s for s in range(0, 1000) if SCHEDULE.should_update(s)]
    assert updates == [100, 200, 300, 400, 500]


def test_schedule_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match=r"PruningSchedule\.final_sparsity=1\.0"):
        PruningSchedule(final_sparsity=1.0)
    with pytest.raises(ValueError, match=r"PruningSchedule\.frequency=300"):
        PruningSchedule(begin_step=0, end_step=1000, frequency=300)
    assert PruningSchedule.from_dict(SCHEDULE.to_dict()) == SCHEDULE


def _lists(seed: int, users: int, cands: int, dim: int):
    torch.manual_seed(seed)
    teacher = MLPRanker(MLPConfig(dim, (96, 48))).eval()
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(cands, dim)).astype(np.float32) for _ in range(users)]
    with torch.no_grad():
        scores = [teacher(torch.from_numpy(x)).numpy() for x in feats]
    return pad_lists(feats, scores)


def test_gradual_pruning_reaches_final_sparsity_and_masks_hold_during_training() -> None:
    data = _lists(seed=0, users=40, cands=30, dim=10)
    torch.manual_seed(3)
    student = MLPRanker(MLPConfig(10, (32, 16)))
    # 40 lists / batch 8 = 5 steps per epoch; 12 epochs = 60 steps; masks at 0, 10, ..., 40.
    schedule = PruningSchedule(
        initial_sparsity=0.0, final_sparsity=0.75, begin_step=0, end_step=40, frequency=10
    )
    pruner = MagnitudePruner(schedule)
    result = train_student(
        student,
        data,
        DistillConfig(hard_weight=0.0),
        TrainConfig(epochs=12, batch_size=8),
        pruner=pruner,
    )
    report = sparsity_report(result.model)
    # Per layer round(0.75 * numel) weights are zero: 240/320 and 384/512.
    assert report["layers.0"] == pytest.approx(240 / 320)
    assert report["layers.2"] == pytest.approx(384 / 512)
    assert report["layers.4"] == 0.0  # output layer not pruned by default
    # Every masked weight is zero and stays zero after folding.
    folded = fold_masks(result.model, pruner)
    for name, mask in pruner.masks.items():
        weight = folded.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0)
        assert torch.equal(weight, result.model.get_submodule(name).weight)
    assert count_cost(folded, 10).nonzero_params < count_cost(student, 10).nonzero_params


def test_schedule_continues_across_calls_with_start_step() -> None:
    data = _lists(seed=1, users=40, cands=30, dim=10)
    torch.manual_seed(4)
    student = MLPRanker(MLPConfig(10, (32, 16)))
    # 5 steps per epoch; masks at 0, 2, ..., 10: the ramp ends in the second call.
    schedule = PruningSchedule(final_sparsity=0.6, end_step=10, frequency=2)
    pruner = MagnitudePruner(schedule)
    first = train_student(
        student, data, DistillConfig(), TrainConfig(epochs=1, batch_size=8), pruner=pruner
    )
    assert first.steps == 5
    assert pruner.current_sparsity == pytest.approx(schedule.sparsity(4))
    second = train_student(
        first.model,
        data,
        DistillConfig(),
        TrainConfig(epochs=1, batch_size=8),
        pruner=pruner,
        start_step=first.steps,
    )
    assert second.steps == 10
    assert pruner.current_sparsity == pytest.approx(0.6)
    assert sparsity_report(second.model)["layers.0"] == pytest.approx(round(0.6 * 320) / 320)
    with pytest.raises(ValueError, match="start_step"):
        train_student(student, data, DistillConfig(), TrainConfig(), start_step=-1)


def test_epoch_choice_waits_for_the_final_sparsity() -> None:
    from slimrank.compression.fit import FitConfig, fit_on_valid

    data = _lists(seed=2, users=40, cands=30, dim=10)
    torch.manual_seed(5)
    student = MLPRanker(MLPConfig(10, (32, 16)))
    # 5 steps per epoch; the ramp ends at step 10, the end of epoch 2.
    pruner = MagnitudePruner(PruningSchedule(final_sparsity=0.5, end_step=10, frequency=5))
    calls = iter(range(10, 0, -1))  # every epoch looks worse than the one before

    def metric(model: nn.Module) -> float:
        return float(next(calls))

    config = FitConfig(epochs=5, patience=2, batch_size=8)
    best, history = fit_on_valid(student, data, DistillConfig(), config, metric, pruner)
    # Epoch 1 scored best but was only partly pruned; epoch 2 is the first at 0.5, and two
    # worse epochs after it stop the run.
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["sparsity"] for h in history][1:] == [0.5, 0.5, 0.5]
    assert history[0]["sparsity"] < 0.5
    assert sparsity_report(best)["layers.0"] == pytest.approx(160 / 320)
    assert sparsity_report(best)["layers.2"] == pytest.approx(256 / 512)


def test_one_shot_magnitude_prune_removes_smallest_weights() -> None:
    layer_model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        layer_model[0].weight.copy_(torch.tensor([[0.1, -2.0, 0.3, 4.0], [-0.2, 5.0, 0.05, 1.0]]))
    pruned = magnitude_prune(layer_model, 0.5)
    expected = torch.tensor([[0.0, -2.0, 0.0, 4.0], [0.0, 5.0, 0.0, 1.0]])
    assert torch.equal(pruned[0].weight, expected)
    assert torch.equal(pruned[2].weight, layer_model[2].weight)  # output layer untouched
    assert layer_model[0].weight[0, 0].item() == pytest.approx(0.1)  # input kept


def test_magnitude_mask_prunes_round_of_sparsity_times_numel_ties_to_the_lower_index() -> None:
    # 0.6 * 6 = 3.6: round() prunes 4 weights, truncation would prune 3.
    weight = torch.tensor([[0.5, -0.1, 0.6], [0.2, -0.3, 0.4]])
    mask = magnitude_mask(weight, 0.6)
    assert mask.tolist() == [[True, False, True], [False, False, False]]
    # 24 tied magnitudes (more than a small-array sort keeps in order by chance): the first
    # round(0.5 * 24) = 12 in flattened order go.
    tied = torch.ones(4, 6)
    assert magnitude_mask(tied, 0.5).flatten().tolist() == [False] * 12 + [True] * 12
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), 1.0)


def test_sparsity_report_counts_exact_zeros_over_all_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 1e-30]]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
    report = sparsity_report(model)
    assert report["0"] == 4 / 8  # 1e-30 is small, not zero
    assert report["2"] == 0.0
    assert report["all"] == 4 / 10  # pooled over the 10 weights, not the mean of the layers


def _mlp(seed: int) -> MLPRanker:
    torch.manual_seed(seed)
    model = MLPRanker(MLPConfig(6, (8, 5), dropout=0.1)).eval()
    with torch.no_grad():  # non-zero biases so that dropped units would matter
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_removing_units_with_zero_outgoing_weights_leaves_outputs_identical() -> None:
    model = _mlp(0)
    with torch.no_grad():
        model.layers[3].weight[:, [1, 6]] = 0.0  # units 1 and 6 of hidden layer 0 feed nothing
        model.layers[6].weight[:, [2]] = 0.0  # unit 2 of hidden layer 1 feeds nothing
    x = torch.randn(50, 6)
    keep = [[0, 2, 3, 4, 5, 7], [0, 1, 3, 4]]
    shrunk = shrink_units(model, keep)
    # Identical up to float summation order (the BLAS kernel blocks the shorter sums differently).
    torch.testing.assert_close(shrunk(x), model(x), rtol=0, atol=1e-6)
    assert shrunk.config.hidden == (6, 4)
    assert [m.weight.shape for m in shrunk.modules() if isinstance(m, nn.Linear)] == [
        (6, 6),
        (4, 6),
        (1, 4),
    ]
    # The zero-outgoing units score 0, so L1 pruning removes exactly them first.
    scores = unit_scores(model)
    assert set(torch.nonzero(scores[0] == 0).flatten().tolist()) == {1, 6}
    auto = prune_units(model, [2 / 8, 1 / 5])
    assert torch.allclose(auto(x), model(x), atol=1e-6)


def test_removing_units_equals_zeroing_them() -> None:
    model = _mlp(1)
    drop = [[0, 5], [3]]
    zeroed = MLPRanker(model.config).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for linear_idx, units in zip([0, 3], drop, strict=True):
            zeroed.layers[linear_idx].weight[units] = 0.0  # ReLU(0 + 0) = 0: the unit is off
            zeroed.layers[linear_idx].bias[units] = 0.0
    keep = [[i for i in range(w) if i not in d] for w, d in zip((8, 5), drop, strict=True)]
    shrunk = shrink_units(model, keep)
    x = torch.randn(3, 20, 6)  # (B, N, F)
    assert torch.allclose(shrunk(x), zeroed(x), atol=1e-6)
    assert not torch.allclose(shrunk(x), model(x), atol=1e-3)  # and it did change the model
    assert count_cost(shrunk, 6).flops_per_candidate == 2 * (6 * 6 + 6 * 4 + 4)


def test_structured_pruning_refuses_non_chain_models() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="LayerNorm"):
        prune_units(model, 0.5)
    with pytest.raises(ValueError, match=r"keep\[0\]"):
        shrink_units(_mlp(0), [[], [0]])


def test_unit_scores_by_hand_count_the_bias() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5]]))
        model[0].bias.copy_(torch.tensor([-1.0, 3.0]))
        model[2].weight.copy_(torch.tensor([[2.0, -1.0]]))
    # unit 0: (|1| + |-2| + |-1|) * |2| = 8; unit 1: (0.5 + 0.5 + 3) * |-1| = 4.
    (scores,) = unit_scores(model)
    assert scores.tolist() == [8.0, 4.0]


def test_prune_units_keeps_width_minus_round_fraction_and_at_least_one() -> None:
    model = MLPRanker(MLPConfig(4, (8, 5)))
    # 0.45 * 8 = 3.6 -> 4 units removed, not 3; 0.45 * 5 = 2.25 -> 2 removed.
    assert prune_units(model, 0.45).config.hidden == (4, 3)
    # Per layer: 0.15 * 5 = 0.75 -> 1 removed, not 0.
    assert prune_units(model, [0.45, 0.15]).config.hidden == (4, 4)
    # 0.95 of 8 and of 5 rounds to every unit: one stays in each layer.
    assert prune_units(model, 0.95).config.hidden == (1, 1)
    with pytest.raises(ValueError, match="fraction"):
        prune_units(model, 1.0)


def test_prune_units_ties_go_to_the_lower_unit_index() -> None:
    # 24 hidden units with identical weights score the same; the first 12 are kept.
    model = nn.Sequential(nn.Linear(3, 24), nn.ReLU(), nn.Linear(24, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(0.1)
        model[2].weight.fill_(1.0)
        model[0].weight[:12, 0] = -0.5  # marks the first 12 units, same magnitudes
    pruned = prune_units(model, 0.5)
    assert pruned[0].weight[:, 0].tolist() == [-0.5] * 12
    expected = shrink_units(model, [list(range(12))])
    for a, b in zip(pruned.parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b)


def test_shrink_units_refuses_indices_outside_the_layer() -> None:
    model = _mlp(0)  # hidden widths (8, 5)
    with pytest.raises(ValueError, match=r"keep\[0\]"):
        shrink_units(model, [[-1, 2], [0]])  # -1 would silently mean unit 7
    with pytest.raises(ValueError, match=r"keep\[1\]"):
        shrink_units(model, [[0], [5]])


def test_shrink_units_takes_each_kept_unit_once_in_index_order() -> None:
    model = _mlp(2)
    x = torch.randn(10, 6)
    messy = shrink_units(model, [[5, 1, 1, 3], [4, 0, 4]])
    clean = shrink_units(model, [[1, 3, 5], [0, 4]])
    assert messy.config.hidden == (3, 2)
    for a, b in zip(messy.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(messy(x), clean(x), rtol=0, atol=0)


def test_prune_then_finetune_under_distillation_recovers_teacher_order() -> None:
    data = _lists(seed=2, users=50, cands=30, dim=10)
    train, held = data.subset(torch.arange(40)), data.subset(torch.arange(40, 50))
    torch.manual_seed(5)
    student = train_student(
        MLPRanker(MLPConfig(10, (32, 16))),
        train,
        DistillConfig(hard_weight=0.0),
        TrainConfig(epochs=40, batch_size=8, lr=1e-2),
    ).model
    pruned = prune_units(student, 0.5)
    tuned = train_student(
        pruned, train, DistillConfig(hard_weight=0.0), TrainConfig(epochs=20, batch_size=8)
    ).model
    assert tuned.config.hidden == (16, 8)

    def held_loss(model: nn.Module) -> float:
        with torch.no_grad():
            s = model(held.features)
        return float(soft_loss(s, held.teacher_scores, held.mask, 1.0))

    assert held_loss(tuned) < held_loss(pruned)
    assert held_loss(tuned) < 2 * held_loss(student) + 1e-3


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(2, 9), min_size=1, max_size=3),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_shrinking_any_units_equals_zeroing_them(widths: list[int], seed: int, data) -> None:
    torch.manual_seed(seed)
    model = MLPRanker(MLPConfig(5, tuple(widths))).eval()
    keep = [
        sorted(data.draw(st.sets(st.integers(0, w - 1), min_size=1, max_size=w))) for w in widths
    ]
    zeroed = MLPRanker(model.config).eval()
    zeroed.load_state_dict(model.state_dict())
    linears = [m for m in zeroed.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, kept, w in zip(linears, keep, widths, strict=False):
            dropped = [i for i in range(w) if i not in kept]
            layer.weight[dropped] = 0.0
            layer.bias[dropped] = 0.0
    x = torch.randn(16, 5)
    shrunk = shrink_units(model, keep)
    assert shrunk.config.hidden == tuple(len(k) for k in keep)
    torch.testing.assert_close(shrunk(x), zeroed(x), rtol=0, atol=1e-5)
