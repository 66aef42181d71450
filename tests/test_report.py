"""The compression table's sparsity and FLOPs columns against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimrank.compression.export import Standardized, export_onnx
from slimrank.compression.flops import (
    LinearCost,
    count_cost,
    flops_ratio,
    linear_cost,
    onnx_linear_cost,
)
from slimrank.compression.gate import quantizable_nodes, quantize
from slimrank.compression.quantize import QuantConfig
from slimrank.evaluation.paired import PairedInterval
from slimrank.pipeline.comparison import Compared, Comparison, comparison_goals
from slimrank.pipeline.report import (
    Report,
    Row,
    SeedSpread,
    render_markdown,
    report_goals,
    table_cells,
    variant_label,
)
from slimrank.ranking.mlp import MLPConfig, MLPRanker
from slimrank.ranking.teacher import DCNv2, TeacherConfig, multiply_adds_per_candidate

# A 4 -> 3 -> 2 -> 1 MLP: 12 + 6 + 2 = 20 weights, 5 of them zero (as pruning leaves them), so
# sparsity 5/20 = 25% and 2 x 20 = 40 FLOPs per candidate. Non-zero weights are at least a fifth
# of their row's largest, so int8 rounding (7-bit in static) takes none of them to zero.
W0 = [[0.5, 0.0, -0.4, 0.3], [0.0, 0.0, 0.6, -0.5], [0.7, 0.2, 0.0, 0.4]]  # (3, 4), 4 zeros
W1 = [[0.9, -0.3, 0.5], [0.0, 0.8, -0.6]]  # (2, 3), 1 zero
W2 = [[1.0, -0.7]]  # (1, 2)
WEIGHTS, ZEROS, FLOPS = 20, 5, 40


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = MLPRanker(MLPConfig(4, (3, 2)))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, w in zip(linears, (W0, W1, W2), strict=True):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.fill_(0.1)
    # Exported as the pipeline exports students: standardization as its own graph step.
    raw = Standardized(model.eval(), np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32))
    out = tmp_path_factory.mktemp("report")
    calib = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)  # (M, F)
    return {"raw": raw, "onnx": export_onnx(raw, out / "fp32.onnx", 4), "calib": calib, "dir": out}


def test_torch_cost_of_the_small_model_is_the_hand_count(small: dict) -> None:
    cost = linear_cost(small["raw"], 4)
    assert (cost.weights, cost.zero_weights, cost.flops_per_candidate) == (WEIGHTS, ZEROS, FLOPS)
    assert cost.sparsity == 0.25
    assert (cost.layers, cost.int8_layers) == (3, 0)
    assert count_cost(small["raw"], 4).flops_per_candidate == FLOPS


def test_count_cost_is_per_candidate_and_leaves_the_model_as_it_was() -> None:
    model = MLPRanker(MLPConfig(4, (3, 2)))
    for candidates in (1, 3, 8, 50):  # divided by the batch it ran, whatever its size
        assert count_cost(model, 4, candidates).flops_per_candidate == FLOPS
    # Counted in eval mode and the mode restored: a BatchNorm's running statistics are not
    # moved by the zeros the counter feeds, and a model in training stays in training.
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    bn.train()
    count_cost(bn, 4)
    assert bn.training and bn[1].training
    assert int(bn[1].num_batches_tracked) == 0
    torch.testing.assert_close(bn[1].running_var, torch.ones(3), rtol=0, atol=0)
    model.eval()
    count_cost(model, 4)
    assert not model.training


def test_flops_ratio_runs_the_teacher_on_its_own_input_width() -> None:
    student = MLPRanker(MLPConfig(4, (3, 2)))  # 40 FLOPs on 4 features
    teacher = MLPRanker(MLPConfig(10, (8,)))  # 2 * (10 * 8 + 8) = 176 FLOPs on 10 features
    assert flops_ratio(student, teacher, 4, teacher_input_dim=10) == pytest.approx(40 / 176)
    assert LinearCost(0, 0, 0).sparsity == 0.0


def test_uint8_weights_count_as_8_bit_layers(small: dict) -> None:
    path = quantize(
        "dynamic",
        small["onnx"],
        small["dir"] / "dynamic-u8.onnx",
        small["calib"],
        QuantConfig(weight_type="uint8"),
    )
    cost = onnx_linear_cost(path)
    assert (cost.weights, cost.flops_per_candidate, cost.layers) == (WEIGHTS, FLOPS, 3)
    assert cost.int8_layers == 3


@pytest.mark.parametrize("variant", ["fp32", "weights", "static", "dynamic"])
def test_onnx_cost_of_every_variant_is_the_hand_count(small: dict, variant: str) -> None:
    path = small["onnx"]
    if variant != "fp32":
        path = quantize(
            variant, path, small["dir"] / f"{variant}.onnx", small["calib"], QuantConfig()
        )
    cost = onnx_linear_cost(path)
    assert (cost.weights, cost.zero_weights, cost.flops_per_candidate) == (WEIGHTS, ZEROS, FLOPS)
    assert cost.sparsity == 0.25
    assert (cost.layers, cost.int8_layers) == (3, 0 if variant == "fp32" else 3)


@pytest.mark.parametrize("variant", ["weights", "static", "dynamic"])
def test_the_int8_row_counts_its_int8_layers_from_the_file(small: dict, variant: str) -> None:
    """An fp32 fallback shows in the row's label: the gate once served three fp32 layers as
    "int8", and only the file's size gave it away."""
    nodes = quantizable_nodes(small["onnx"])
    gate = {"accepted": True, "mode": variant}
    for fallback in range(len(nodes)):
        path = small["dir"] / f"{variant}-fp32x{fallback}.onnx"
        quantize(variant, small["onnx"], path, small["calib"], QuantConfig(), nodes[:fallback])
        cost = onnx_linear_cost(path)
        assert (cost.layers, cost.int8_layers) == (3, 3 - fallback)
        label = variant_label("pruned int8", "int8", cost, gate)
        assert label == f"pruned int8 ({variant}; {3 - fallback} of 3 layers int8)"
    fp32 = onnx_linear_cost(small["onnx"])
    assert variant_label("per-layer precision", "precision", fp32, gate) == (
        "per-layer precision (0 of 3 layers int8)"
    )
    # A rejected gate names no mode; other rows keep their label.
    assert variant_label("pruned int8", "int8", fp32, {"accepted": False}) == (
        "pruned int8 (0 of 3 layers int8)"
    )
    assert variant_label("pruned fp16 weights", "fp16", fp32, gate) == "pruned fp16 weights"


def test_teacher_cost_is_its_matmuls() -> None:
    # 3 features, no ids: one 3x3 cross layer (9), deep 3 -> 4 (12), head 3 + 4 -> 1 (7).
    config = TeacherConfig(n_features=3, n_users=5, n_items=7, id_dim=0, n_cross=1, deep=(4,))
    teacher = DCNv2(config)
    with torch.no_grad():
        teacher.cross.layers[0].weight[0, :] = 0.0  # 3 zeros
    cost = linear_cost(teacher, 3)
    assert (cost.weights, cost.zero_weights, cost.flops_per_candidate) == (28, 3, 56)
    # The teacher's own count adds the cross layer's 3 elementwise products (not matmuls).
    assert multiply_adds_per_candidate(config) == 28 + 3


def _row(key: str, label: str, sparsity: float | None, flops: int | None) -> Row:
    return Row(key, label, 0.3, 0.2, 0.25, 20, sparsity, flops, 1000, 1e-4, 10.0)


def test_table_shows_sparsity_and_flops_for_every_ranker() -> None:
    rows = (
        Row("retrieval", "retrieval only", 0.2, 0.1, 0.2, None, None, None, None, None, None),
        _row("teacher", "teacher fp32", 0.0, 2_249_216),
        _row("student_pruned", "pruned, KD", 0.4990925, 17_632),
        _row("int8", "pruned int8", 0.25, FLOPS),
    )
    decision = {"min_same_top_k": 0.95, "same_top_k": 0.986, "excluded_nodes": []}
    gate = {
        "min_ratio": 0.99,
        "accepted": True,
        "mode": "weights",
        "decisions": {"weights": decision},
    }
    ci = PairedInterval(0.0123, 0.004, 0.0201, 0.95, 900, 1000)
    comparison = Comparison(
        10,
        (
            Compared("served", "-", False, 0.26, 0.30, None),
            Compared("EASE", "l2=500", True, 0.25, 0.2877, ci),
        ),
        "EASE",
    )
    report = Report(rows, (), 10, 200, 500, gate, comparison)
    header, cells = table_cells(report)
    assert header[3:6] == ["params", "sparsity", "FLOPs"]
    assert [c[4:6] for c in cells] == [
        ["-", "-"],
        ["0.0%", "2.25M"],
        ["49.9%", "17.6k"],
        ["25.0%", "40"],
    ]
    text = render_markdown(report)
    assert "| pruned int8 | 0.3000 | 0.2000 | 20 | 25.0% | 40 |" in text
    assert "2 per multiply-add of the Linear layers" in text
    assert "same top-10 set as fp32 for >= 95% of validation users" in text
    assert "passed with int8 mode weights (same top-10: 98.6%)" in text
    assert "| EASE | l2=500 | 0.2500 | 0.2877 | +0.0123 [+0.0040, +0.0201] |" in text
    assert "paired bootstrap over the 900 test users" in text
    assert "Measured on: CPU not recorded." in text
    cpu = {"model": "Some CPU", "cpus": 2, "flags": ["avx2"], "vnni": False, "steal_pct": 12.5}
    timed = dataclasses.replace(report, cpu=cpu)
    assert (
        "Measured on: Some CPU (2 CPUs, without VNNI; avx2). Hypervisor steal while the "
        "rankers were timed: 12.5%." in render_markdown(timed)
    )
    unmeasured = dataclasses.replace(report, cpu={**cpu, "steal_pct": None})
    assert "steal" not in render_markdown(unmeasured)
    record = json.loads(json.dumps(timed.to_dict()))
    assert record["cpu"]["steal_pct"] == 12.5
    assert record["comparison"]["rows"][1]["served_minus"]["low"] == 0.004
    assert record["rows"][3]["sparsity"] == 0.25 and record["rows"][3]["flops"] == FLOPS
    # Counts switch unit at exactly a thousand and a million.
    one_million = dataclasses.replace(report.rows[1], flops=1_000_000)
    one_thousand = dataclasses.replace(report.rows[1], flops=1_000)
    at = dataclasses.replace(report, rows=(one_million, one_thousand))
    assert [c[5] for c in table_cells(at)[1]] == ["1.00M", "1.0k"]


def test_seed_spread_is_the_range_and_the_sample_std() -> None:
    """Three seeds 0.30, 0.32, 0.34: range 0.04, sample standard deviation 0.02."""
    seeds = SeedSpread({0: 0.30, 1: 0.32, 2: 0.34})
    assert seeds.spread == pytest.approx(0.04) and seeds.std == pytest.approx(0.02)
    assert seeds.to_dict()["test_ndcg"] == {"0": 0.30, "1": 0.32, "2": 0.34}
    assert np.isnan(SeedSpread({0: 0.3}).std)


def _ranked(key: str, ndcg: float, flops: int | None, speedup: float | None) -> Row:
    return Row(key, key, ndcg, 0.2, 0.25, 20, 0.0, flops, 1000, 1e-4, speedup)


def test_goals_by_hand() -> None:
    rows = [
        _ranked("retrieval", 0.318, None, None),
        _ranked("teacher", 0.3500, 2_000_000, 1.0),
        _ranked("student_plain", 0.3460, 200_000, 12.0),
        _ranked("student_distill", 0.3470, 200_000, 12.0),
        _ranked("student_pruned", 0.3466, 80_000, 20.0),
        _ranked("int8", 0.3465, 80_000, 10.0),
    ]
    goals = report_goals(rows, 10)
    assert [met for _, met, _ in goals] == [True, True, True, True]
    assert goals[0][2] == "200,000 vs 2,000,000"  # exactly a tenth passes
    assert goals[1][2] == "0.990 x"  # 0.3465 / 0.35 = 0.99
    # One FLOP over a tenth, 0.3464 (0.9897 x), 9.9x and a distilled student that only ties.
    rows[3] = _ranked("student_distill", 0.3460, 200_001, 12.0)
    rows[5] = _ranked("int8", 0.3464, 80_000, 9.9)
    assert [met for _, met, _ in report_goals(rows, 10)] == [False, False, False, False]


def _comparison(diff: float, low: float) -> Comparison:
    ci = PairedInterval(diff, low, diff + 0.01, 0.95, 900, 1000)
    return Comparison(
        10,
        (
            Compared("served", "-", False, 0.27, 0.35, None),
            Compared("EASE", "l2=500", True, 0.26, 0.35 - diff, ci),
            Compared("most popular", "-", True, 0.1, 0.14, ci),
        ),
        "EASE",
    )


def test_equal_information_goal_needs_the_margin_and_an_interval_above_zero() -> None:
    assert comparison_goals(_comparison(0.012, 0.003))[0][1]
    assert "strongest peer (EASE)" in comparison_goals(_comparison(0.012, 0.003))[0][0]
    assert not comparison_goals(_comparison(0.008, 0.003))[0][1]  # under 0.01
    assert comparison_goals(_comparison(0.01, 0.003))[0][1]  # exactly the margin is enough
    assert not comparison_goals(_comparison(0.012, -0.001))[0][1]  # interval reaches zero


def test_the_comparison_says_which_peers_were_not_run_and_why() -> None:
    from slimrank.evaluation.peers import PEERS, peers_for
    from slimrank.pipeline.comparison import comparison_markdown

    _, skipped = peers_for(30_000, PEERS)
    text = "\n".join(
        comparison_markdown(dataclasses.replace(_comparison(0.0, 0.0), skipped=skipped))
    )
    assert (
        "Not computed: EASE (dense item-item matrices, past 20,000 items); item-KNN (dense "
        "item-item matrices, past 20,000 items); RP3beta (dense item-item matrices, past "
        "20,000 items); ALS (implicit) (a grid of 27 fits tuned on ml-100k, past 20,000 items)."
    ) in text
    assert "Not computed" not in "\n".join(comparison_markdown(_comparison(0.0, 0.0)))


def test_onnx_cost_refuses_a_weight_it_cannot_read(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="not a constant"):
        onnx_linear_cost(tmp_path / "m.onnx")


def _overlaps(boxes: list) -> list[tuple[int, int]]:
    return [
        (i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes) if i < j and a.overlaps(b)
    ]


def test_the_plot_labels_and_ticks_do_not_overlap() -> None:
    """Rankers of one size sit µs apart with equal NDCG (the tiny run): every label must still
    be readable, so none is drawn on the points and no two tick labels collide."""
    import matplotlib.pyplot as plt

    from slimrank.pipeline.report import quality_latency_figure

    rows = [Row("retrieval", "retrieval only", 0.2, 0.1, 0.2, None, None, None, None, None, None)]
    rows += [_ranked("teacher", 0.40, 100, 1.0)]
    rows += [
        dataclasses.replace(_ranked(f"s{i}", 0.43, 10, 10.0), label=f"student variant {i}")
        for i in range(9)
    ]
    rows = [
        dataclasses.replace(r, p50_seconds=None if r.key == "retrieval" else p50)
        for r, p50 in zip(rows, [None, 200e-6, *(17e-6 + 1e-7 * i for i in range(9))], strict=True)
    ]
    comparison = Comparison(10, (Compared("EASE", "-", True, 0.3, 0.5, None),), "EASE")
    report = Report(tuple(rows), (), 10, 30, 10, {}, comparison)
    fig = quality_latency_figure(report)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        assert len(ax.texts) == 0  # no annotation on the points
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert [r.label for r in rows[1:]] == legend[:10]  # every ranker named once
        ticks = [
            t.get_window_extent(renderer)
            for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
            if t.get_visible() and t.get_text()
        ]
        assert len(ticks) >= 2 and _overlaps(ticks) == []
        labels = [t.get_window_extent(renderer) for t in ax.get_legend().get_texts()]
        assert _overlaps(labels) == []
    finally:
        plt.close(fig)
