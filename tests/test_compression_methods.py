"""The compression table's other methods against hand-built references: pseudo labels, Taylor
and L1-driven pruning, the student loop, fp16 weights and per-layer precision, the int8 mode
choice, CPU flags."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.cpu import (
    CpuTimes,
    cpu_features,
    cpu_times,
    parse_cpuinfo,
    parse_proc_stat,
    steal_share,
)
from slimrank.compression.distill import DistillConfig, distillation_loss, pseudo_labels
from slimrank.compression.export import export_onnx
from slimrank.compression.fit import (
    FitConfig,
    Shard,
    TrainConfig,
    fit_epochs,
    fit_on_valid,
    l1_penalty,
    state_arrays,
    train_epoch,
    train_student,
)
from slimrank.compression.flops import onnx_linear_cost
from slimrank.compression.gate import ReferenceLists
from slimrank.compression.gradient_pruning import TaylorPruner, ThresholdPruner, taylor_mask
from slimrank.compression.lists import ListData, pad_lists
from slimrank.compression.precision import (
    PrecisionSearch,
    all_plans,
    apply_plan,
    fp16_weights,
    search_precision,
)
from slimrank.compression.pruning import PruningSchedule, magnitude_mask
from slimrank.compression.quantize import quantizable_nodes
from slimrank.compression.scorer import Scorer, ScorerConfig, bench_scorer, score_lists
from slimrank.pipeline.compress_steps import choose_mode
from slimrank.ranking.mlp import MLPConfig, MLPRanker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- pseudo labels ------------------------------------------------------------------------------


def test_pseudo_labels_are_the_teachers_top_k_per_list() -> None:
    teacher = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.7, 0.0],  # top 2: candidates 1 and 3
            [2.0, 2.0, 1.0, 3.0, 9.0],  # 4 is a pad; top 2: 3, then the tie 0/1 goes to 0
            [5.0, 1.0, 0.0, 0.0, 0.0],  # one real candidate: only it
        ]
    )
    mask = torch.tensor(
        [
            [True, True, True, True, True],
            [True, True, True, True, False],
            [False, True, False, False, False],
        ]
    )
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(pseudo_labels(teacher, mask, 2), expected)
    assert pseudo_labels(teacher, mask, 10).sum(dim=1).tolist() == [5.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="k"):
        pseudo_labels(teacher, mask, 0)


# -- Taylor and L1-driven pruning ---------------------------------------------------------------


def _two_layer() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]]))
        model[2].weight.copy_(torch.tensor([[0.01, 0.02]]))
    return model


def test_taylor_masks_follow_the_summed_weight_times_gradient_importance() -> None:
    model = _two_layer()
    schedule = PruningSchedule(final_sparsity=0.5, begin_step=0, end_step=2, frequency=2)
    pruner = TaylorPruner(schedule)
    w = model[0].weight.detach().clone()
    grads = [
        torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.1, 10.0]]),
        torch.tensor([[0.5, 0.1, 0.01], [0.01, 0.1, -2.0]]),
    ]
    for g in grads:
        model[0].weight.grad = g
        model[2].weight.grad = torch.ones(1, 2)
        pruner.observe(model)
    # By hand: |w*g1| + |w*g2| = [[1.5, 0.4, 0.03], [0.04, 1.0, 6.0]]; at sparsity 0.5 the 3
    # least important of 6 go: (0, 2) 0.03, (1, 0) 0.04, (0, 1) 0.4. Magnitude would have
    # pruned (1, 2) (|0.5|) instead: the gradients changed the choice.
    pruner.update(model, 2)
    keep = torch.tensor([[True, False, False], [False, True, True]])
    assert torch.equal(pruner.masks["0"], keep)
    assert torch.equal(model[0].weight, w * keep)
    assert not torch.equal(keep, magnitude_mask(w, 0.5))
    assert "2" not in pruner.masks  # the output layer is not pruned
    assert pruner.importance == {}  # gathered afresh after each update
    assert pruner.current_sparsity == pytest.approx(0.5)


def test_threshold_pruner_takes_one_magnitude_mask_at_its_step() -> None:
    model = _two_layer()
    pruner = ThresholdPruner(0.5, at_step=3)
    for step in range(3):
        assert pruner.update(model, step) == 0.0
    assert pruner.masks == {}
    w = model[0].weight.detach().clone()
    pruner.update(model, 3)
    keep = torch.tensor([[False, False, True], [True, True, False]])  # |w| >= 3 stay
    assert torch.equal(pruner.masks["0"], keep)
    assert torch.equal(model[0].weight, w * keep)
    with torch.no_grad():
        model[0].weight.copy_(torch.full((2, 3), 7.0))  # later steps move the weights
    pruner.update(model, 10)
    assert torch.equal(pruner.masks["0"], keep)  # the mask is kept, not recomputed
    assert torch.equal(model[0].weight, torch.where(keep, 7.0, 0.0))


def test_l1_penalty_is_the_sum_of_the_prunable_weights_magnitudes() -> None:
    model = _two_layer()
    assert l1_penalty(model).item() == pytest.approx(1 + 2 + 3 + 4 + 5 + 0.5)  # not the output


def _lists(seed: int, users: int = 30, cands: int = 12, dim: int = 6) -> ListData:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    feats = [rng.normal(size=(cands, dim)).astype(np.float32) for _ in range(users)]
    teacher = [(x @ w).astype(np.float32) for x in feats]
    labels = [(t > np.quantile(t, 0.8)).astype(np.float32) for t in teacher]
    return pad_lists(feats, teacher, labels)


def test_the_l1_penalty_in_the_loop_shrinks_the_prunable_weights() -> None:
    data = _lists(0)
    torch.manual_seed(0)
    student = MLPRanker(MLPConfig(6, (16, 8)))
    config = FitConfig(epochs=4, patience=0, batch_size=8)

    def metric(model: nn.Module) -> float:
        return 0.0

    plain, _ = fit_on_valid(student, data, DistillConfig(), config, metric)
    lasso, _ = fit_on_valid(
        student, data, DistillConfig(), dataclasses.replace(config, l1=0.05), metric
    )
    assert l1_penalty(lasso).item() < 0.8 * l1_penalty(plain).item()


# -- the student loop --------------------------------------------------------------------------


def _student(seed: int) -> MLPRanker:
    torch.manual_seed(seed)
    return MLPRanker(MLPConfig(6, (16, 8)))


def _plain_epoch(model: nn.Module, data: ListData, seed: int, batch_size: int = 8) -> float:
    """One epoch by hand, as fit_epochs runs it: a fresh Adam, the order from ``seed``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    result = train_epoch(
        model, optimizer, data, DistillConfig(), batch_size, torch.Generator().manual_seed(seed)
    )
    return result.loss_sum / result.batches


def test_fit_keeps_the_first_of_tied_best_epochs_and_shuffles_each_epoch_anew() -> None:
    """A tie is not better: the epoch-1 weights are kept and epochs 2 and 3 (tie, then worse)
    exhaust patience 2. Epoch ``e`` trains with a fresh Adam on the order of seed + e."""
    data = _lists(1)
    values = iter([3.0, 3.0, 1.0, 5.0, 5.0])

    def metric(model: nn.Module) -> float:
        return next(values)

    config = FitConfig(epochs=5, patience=2, batch_size=8, seed=10)
    model = _student(2)
    result = fit_epochs(model, data, DistillConfig(), config, metric)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.best_metric == 3.0
    plain = _student(2)
    losses = [_plain_epoch(plain, data, 10)]
    after_first = state_arrays(plain)
    losses += [_plain_epoch(plain, data, 11), _plain_epoch(plain, data, 12)]
    assert [h["loss"] for h in result.history] == pytest.approx(losses, rel=1e-6)
    for name, value in after_first.items():
        torch.testing.assert_close(result.state[name], value)
    assert not torch.equal(result.state["layers.0.weight"], model.layers[0].weight.detach())


def test_train_student_logs_the_mean_batch_loss_of_each_epoch() -> None:
    data = _lists(2)  # 30 lists, batch 8: 4 batches an epoch
    student = _student(3)
    result = train_student(student, data, DistillConfig(), TrainConfig(epochs=2, batch_size=8))
    plain = _student(3)
    optimizer = torch.optim.Adam(plain.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(2):
        epoch = train_epoch(plain, optimizer, data, DistillConfig(), 8, generator)
        assert epoch.batches == 4
        expected.append(epoch.loss_sum / 4)
    assert list(result.epoch_loss) == pytest.approx(expected, rel=1e-6)


def test_a_shard_trains_on_its_own_part_of_each_global_batch() -> None:
    """Worker 1 of 2, one global batch of all 30 lists: its loss is the loss of the second
    half of the epoch's order, on the initial weights."""
    data = _lists(3)
    model = _student(4)
    plain = _student(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(7)
    got = train_epoch(model, optimizer, data, DistillConfig(), 30, generator, shard=Shard(1, 2))
    order = torch.randperm(30, generator=torch.Generator().manual_seed(7))
    part = data.subset(order[15:])
    with torch.no_grad():
        want = distillation_loss(
            plain(part.features), part.teacher_scores, part.labels, part.mask, DistillConfig()
        ).total
    assert got.batches == 1
    assert got.loss_sum == pytest.approx(float(want), rel=1e-6)


def test_dropout_is_off_where_a_student_is_scored() -> None:
    """The validation metric sees the student in eval mode, and train_student and fit_on_valid
    return it so: a dropout student scores the same features the same way twice."""
    data = _lists(5)
    torch.manual_seed(6)
    student = MLPRanker(MLPConfig(6, (16, 8), dropout=0.5))
    seen: list[bool] = []

    def metric(model: nn.Module) -> float:
        seen.append(model.training)
        return 0.0

    config = FitConfig(epochs=2, patience=0, batch_size=8)
    fitted, _ = fit_on_valid(student, data, DistillConfig(), config, metric)
    trained = train_student(student, data, DistillConfig(), TrainConfig(epochs=1)).model
    assert seen == [False, False]
    x = data.features[0]
    with torch.no_grad():
        for model in (fitted, trained):
            assert torch.equal(model(x), model(x))


def test_the_loop_shows_a_taylor_pruner_each_steps_gradients() -> None:
    """One step of the whole batch, masks at step 1: the mask is the Taylor mask of that
    step's |w * dL/dw| on the initial weights (by hand), not a magnitude mask."""
    data = _lists(4)
    student = _student(5)
    schedule = PruningSchedule(final_sparsity=0.5, begin_step=0, end_step=1, frequency=1)
    pruner = TaylorPruner(schedule)
    train_student(student, data, DistillConfig(), TrainConfig(epochs=1, batch_size=30), pruner)
    plain = _student(5)
    batch = data.subset(torch.randperm(30, generator=torch.Generator().manual_seed(0)))
    scores = plain(batch.features)
    distillation_loss(
        scores, batch.teacher_scores, batch.labels, batch.mask, DistillConfig()
    ).total.backward()
    for name in ("layers.0", "layers.2"):
        weight = plain.get_submodule(name).weight
        want = taylor_mask((weight * weight.grad).abs().detach(), 0.5)
        assert torch.equal(pruner.masks[name], want), name
        assert not torch.equal(want, magnitude_mask(weight.detach(), 0.5))


# -- fp16 weights and per-layer precision -------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = MLPRanker(MLPConfig(6, (16, 8))).eval()
    return export_onnx(model, tmp_path_factory.mktemp("precision") / "fp32.onnx", 6)


def _scores(path: Path, x: np.ndarray) -> np.ndarray:
    return Scorer(path, sha256_file(path), ScorerConfig()).score(x)


def test_fp16_weights_score_like_fp32_and_store_half_precision(
    fp32_ranker: Path, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    nodes = quantizable_nodes(fp32_ranker)
    half = fp16_weights(fp32_ranker, tmp_path / "fp16.onnx", nodes)
    np.testing.assert_allclose(_scores(half, x), _scores(fp32_ranker, x), rtol=2e-3, atol=2e-3)
    graph = onnx.load(str(half)).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.name in nodes]
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    assert all(dtypes[casts[w]] == onnx.TensorProto.FLOAT16 for w in weights)
    with pytest.raises(ValueError, match="nodes"):
        fp16_weights(fp32_ranker, tmp_path / "x.onnx", ["no_such_node"])


def test_a_mixed_plan_puts_each_layer_in_its_precision(fp32_ranker: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    first, second, last = quantizable_nodes(fp32_ranker)
    plan = {first: "int8", second: "fp16", last: "fp32"}
    path = apply_plan(fp32_ranker, tmp_path / "mixed.onnx", plan)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops  # int8 activations
    assert "Cast" in ops  # the fp16 layer's weight
    # The table's FLOPs and sparsity read each weight through its cast, transpose or int8 form.
    mixed, fp32 = onnx_linear_cost(path), onnx_linear_cost(fp32_ranker)
    assert (mixed.weights, mixed.flops_per_candidate) == (fp32.weights, fp32.flops_per_candidate)
    ref = _scores(fp32_ranker, x)
    err = np.abs(_scores(path, x) - ref).mean() / ref.std()
    assert err < 0.05  # int8 activations in one layer: within a few % of the score spread


def test_all_plans_enumerate_every_assignment() -> None:
    plans = all_plans(["a", "b"], ["int8", "fp32"])
    assert plans == [
        {"a": "int8", "b": "int8"},
        {"a": "int8", "b": "fp32"},
        {"a": "fp32", "b": "int8"},
        {"a": "fp32", "b": "fp32"},
    ]


def test_the_search_keeps_the_fastest_plan_that_passes(fp32_ranker: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(20, 15, 6)).astype(np.float32)
    lists = ReferenceLists(features, np.ones((20, 15), bool), 5)
    fp32 = Scorer(fp32_ranker, sha256_file(fp32_ranker), ScorerConfig())
    reference = lists.scores(fp32)

    def agreement(scorer: Scorer) -> float:  # the metric: share of scores within 1e-6
        return float((np.abs(score_lists(scorer, features) - reference) < 1e-6).mean()) + 1.0

    def search(min_ratio: float) -> PrecisionSearch:
        return search_precision(
            fp32_ranker,
            tmp_path / str(min_ratio),
            ("fp16", "fp32"),
            agreement,
            2.0,
            reference,
            lists,
            min_ratio,
            0.0,
            features[0],
            repeats=3,
        )

    strict = search(1.0)  # only a plan that scores exactly like fp32 passes: the all-fp32 one
    passed = [r.plan for r in strict.results if r.passed]
    assert len(strict.results) == 8
    assert passed == [dict.fromkeys(quantizable_nodes(fp32_ranker), "fp32")]
    assert strict.chosen == 7
    assert (tmp_path / "1.0" / "ranker.onnx").exists()
    assert sorted(p.name for p in (tmp_path / "1.0").iterdir()) == ["ranker.onnx"]
    loose = search(0.1)  # every plan passes; the chosen one has the smallest measured p50
    assert all(r.passed for r in loose.results)
    assert loose.chosen is not None
    best = loose.results[loose.chosen].p50_seconds
    assert best == min(r.p50_seconds for r in loose.results)


# -- the int8 mode and the CPU it is chosen on --------------------------------------------------


def test_choose_mode_prefers_fewer_fallbacks_unless_another_is_clearly_faster() -> None:
    modes = ["weights", "static", "dynamic"]
    fallbacks = {"weights": 0, "static": 1, "dynamic": 0}
    even = {"weights": 100e-6, "static": 50e-6, "dynamic": 95e-6}
    assert choose_mode(modes, fallbacks, even, "latency", 0.1)[0] == "static"  # 50% faster
    close = {"weights": 100e-6, "static": 95e-6, "dynamic": 92e-6}
    assert choose_mode(modes, fallbacks, close, "latency", 0.1)[0] == "weights"  # within 10%
    assert choose_mode(modes, fallbacks, even, "fallbacks", 0.1)[0] == "weights"
    exact = {"weights": 1.0, "static": 0.75, "dynamic": 1.0}  # exactly the margin is enough
    assert choose_mode(modes, fallbacks, exact, "latency", 0.25)[0] == "static"
    assert choose_mode(["static"], {"static": 2}, {"static": 1.0}, "latency", 0.1)[0] == "static"
    assert choose_mode([], {}, {}, "latency", 0.1) == (None, "no mode passed the gate")


def test_bench_scorer_reports_the_median_of_its_repeats(
    fp32_ranker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted clock readings around the real scorer's calls (warmup untimed): repeats of
    1, 9 and 1 s give the median 1 s, not the mean."""
    import time

    readings = iter([0.0, 1.0, 10.0, 19.0, 20.0, 21.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(readings))
    x = np.zeros((4, 6), dtype=np.float32)
    assert bench_scorer(fp32_ranker, x, repeats=3, warmup=2) == 1.0


def test_cpu_flags_name_vnni(tmp_path: Path) -> None:
    text = (
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    assert parse_cpuinfo(text) == ("Some CPU", {"fpu", "sse", "avx2", "avx512f", "avx512_vnni"})
    (tmp_path / "cpuinfo").write_text(text)
    found = cpu_features(tmp_path / "cpuinfo")
    assert found["flags"] == ["avx2", "avx512_vnni", "avx512f"] and found["vnni"] is True
    (tmp_path / "avx2").write_text("model name\t: Old\nflags\t: avx2 sse\n")
    assert cpu_features(tmp_path / "avx2")["vnni"] is False
    # The AVX-VNNI of client CPUs without AVX-512 (Alder Lake and later) counts as VNNI too.
    (tmp_path / "client").write_text("model name\t: Client\nflags\t: avx2 avx_vnni\n")
    assert cpu_features(tmp_path / "client") == {
        "model": "Client",
        "cpus": os.cpu_count(),
        "flags": ["avx2", "avx_vnni"],
        "vnni": True,
    }
    assert cpu_features(tmp_path / "missing")["vnni"] is None


def test_steal_share_from_proc_stat(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user
    before = "cpu  100 0 50 800 10 0 5 35 40 0\ncpu0 50 0 25 400 5 0 2 18 20 0\nintr 1 2\n"
    after = "cpu  400 0 150 1000 10 0 5 235 300 0\ncpu0 200 0 75 500 5 0 2 118 150 0\n"
    assert parse_proc_stat(before) == CpuTimes(total=1000, steal=35)
    assert parse_proc_stat(after) == CpuTimes(total=1800, steal=235)
    # 800 ticks passed on all CPUs together, 200 of them stolen
    assert steal_share(parse_proc_stat(before), parse_proc_stat(after)) == 0.25
    assert steal_share(parse_proc_stat(after), parse_proc_stat(after)) is None
    assert steal_share(None, parse_proc_stat(after)) is None
    with pytest.raises(ValueError, match="steal"):
        parse_proc_stat("cpu  1 2 3 4 5 6 7\n")
    with pytest.raises(ValueError, match="no 'cpu' line"):
        parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n")
    (tmp_path / "stat").write_text(after)
    assert cpu_times(tmp_path / "stat") == CpuTimes(total=1800, steal=235)
    assert cpu_times(tmp_path / "missing") is None
    live = cpu_times()
    assert live is not None and 0 <= live.steal <= live.total
