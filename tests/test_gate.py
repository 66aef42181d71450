"""The accuracy gate on a real small int8 model: pass, fall back layer by layer, reject.

Two checks: validation NDCG against the teacher's, and the int8 top-10 against the fp32 top-10
of the same lists (the fp32 ONNX model is the reference the gate scores itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_quantize import _int8_weights

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.agreement import same_top_k
from slimrank.compression.export import export_onnx
from slimrank.compression.gate import (
    GateConfig,
    ReferenceLists,
    fallback_sequence,
    gate_int8,
    quality_ratio,
)
from slimrank.compression.quantize import quantizable_nodes
from slimrank.compression.scorer import Scorer
from slimrank.evaluation.metrics import ranking_metrics
from slimrank.ranking.mlp import MLPConfig, MLPRanker

USERS, CANDS, DIM = 50, 200, 16


def _target(x: np.ndarray) -> np.ndarray:
    return np.sin(2 * x[..., 0]) + x[..., 1] * x[..., 2] + 0.5 * x[..., 3] ** 2 - x[..., 4]


def _relevance(scores: np.ndarray, k: int = 10) -> sp.csr_matrix:
    """Mark each user's top-``k`` candidates by ``scores`` ``(U, N)`` as relevant."""
    top = np.argsort(-scores, axis=1)[:, :k]  # (U, k)
    rows = np.repeat(np.arange(len(scores)), k)
    return sp.csr_matrix((np.ones(rows.size), (rows, top.ravel())), shape=scores.shape)


def _ndcg_metric(lists: np.ndarray, truth: sp.csr_matrix):
    """The pipeline-style callback: NDCG@10 of the scorer's ranking of each user's list."""

    def metric(scorer: Scorer) -> float:
        scores = scorer.score(lists.reshape(-1, DIM)).reshape(lists.shape[:2])  # (U, N)
        topk = np.argsort(-scores, axis=1)[:, :10]
        return ranking_metrics(topk, truth, ks=(10,))["ndcg@10"]

    return metric


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, DIM)).astype(np.float32)  # (M, F)
    y = torch.from_numpy(_target(x).astype(np.float32))
    torch.manual_seed(1)
    model = MLPRanker(MLPConfig(DIM, (64, 32)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(250):
        loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lists = rng.normal(size=(USERS, CANDS, DIM)).astype(np.float32)  # (U, N, F)
    out = tmp_path_factory.mktemp("gate")
    fp32 = export_onnx(model, out / "ranker.fp32.onnx", DIM)
    with torch.no_grad():
        fp32_scores = model(torch.from_numpy(lists)).numpy()  # (U, N)
    yield {"lists": lists, "calib": x[:1000], "fp32": fp32, "fp32_scores": fp32_scores}
    torch.set_num_threads(threads)


def _all_real(lists: np.ndarray) -> ReferenceLists:
    return ReferenceLists(lists, np.ones(lists.shape[:2], dtype=bool), k=10)


def _scores(path: str | Path, lists: np.ndarray) -> np.ndarray:
    scorer = Scorer(path, sha256_file(path))
    return np.stack([scorer.score(x) for x in lists])  # (U, N)


def test_int8_passes_at_first_attempt_against_its_fp32_self(setup: dict, tmp_path: Path) -> None:
    """NDCG@10 on the true relevance alone (top-10 check off); int8 keeps 99.7% of fp32's."""
    metric = _ndcg_metric(setup["lists"], _relevance(_target(setup["lists"])))
    fp32_metric = metric(Scorer(setup["fp32"], sha256_file(setup["fp32"])))
    config = GateConfig(min_same_top_k=0.0)
    decision = gate_int8(setup["fp32"], tmp_path, metric, fp32_metric, setup["calib"], config)
    assert decision.accepted
    assert decision.same_top_k is None
    assert len(decision.attempts) == 1
    assert decision.excluded_nodes == ()
    assert decision.ratio == pytest.approx(decision.candidate_metric / fp32_metric)
    assert decision.ratio >= 0.99
    assert decision.sha256 == sha256_file(decision.model_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranker.int8.onnx"]


@pytest.mark.parametrize("order", ["first_last", "last_first"])
def test_failing_int8_falls_back_one_layer_at_a_time(
    setup: dict, tmp_path: Path, order: str
) -> None:
    """Relevance = the fp32 model's own top-10, so fp32 scores NDCG 1.0 and any int8 swap in a
    top-10 costs. A pass mark above 1 shows every attempt the gate makes (measured ratios,
    first_last: 0.976, 0.994, 0.998 on an AMD EPYC, 0.974, -, 0.999 on an Intel Xeon with AMX);
    the pass mark of the second run is the best of the fallbacks, so the fully int8 model fails
    it and the gate stops at the first attempt that reaches it."""
    metric = _ndcg_metric(setup["lists"], _relevance(setup["fp32_scores"]))
    nodes = quantizable_nodes(setup["fp32"])
    ordered = nodes if order == "first_last" else nodes[::-1]

    probe = gate_int8(
        setup["fp32"],
        tmp_path / "probe",
        metric,
        1.0,
        setup["calib"],
        GateConfig(min_ratio=1.001, min_same_top_k=0.0, fallback_order=order),
    )
    assert not probe.accepted and probe.model_path is None
    # One more layer in fp32 each time, and never all of them: the last try keeps one int8.
    tried = [a.excluded_nodes for a in probe.attempts]
    assert tried == [tuple(ordered[:k]) for k in range(len(nodes))]
    assert len(tried[-1]) == len(nodes) - 1
    assert list((tmp_path / "probe").iterdir()) == []
    ratios = [a.ratio for a in probe.attempts]
    assert all(r <= 1.0 for r in ratios) and max(ratios[1:]) > ratios[0]

    mark = max(ratios[1:]) - 1e-9
    expected = next(k for k, r in enumerate(ratios) if r >= mark)
    config = GateConfig(min_ratio=mark, min_same_top_k=0.0, fallback_order=order)
    decision = gate_int8(setup["fp32"], tmp_path, metric, 1.0, setup["calib"], config)
    assert not decision.attempts[0].passed
    assert decision.attempts[0].excluded_nodes == ()
    assert len(decision.attempts) == expected + 1
    for k, attempt in enumerate(decision.attempts):
        assert attempt.excluded_nodes == tuple(ordered[:k])
        assert attempt.ratio == pytest.approx(ratios[k])  # the same quantization, measured again
        assert attempt.passed == (k == expected)
    assert decision.accepted
    assert decision.excluded_nodes == decision.attempts[-1].excluded_nodes
    assert decision.candidate_metric == decision.attempts[-1].metric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe", "ranker.int8.onnx"]
    int8_layers = len(_int8_weights(Path(decision.model_path)))
    assert 1 <= int8_layers == len(nodes) - len(decision.excluded_nodes)

    record = json.loads(json.dumps(decision.to_dict()))
    assert record["accepted"] is True
    assert record["min_ratio"] == mark
    assert record["excluded_nodes"] == list(decision.excluded_nodes)
    assert len(record["attempts"]) == len(decision.attempts)
    assert record["attempts"][0]["passed"] is False


def test_a_model_that_passes_only_with_every_layer_in_fp32_is_rejected(
    setup: dict, tmp_path: Path
) -> None:
    """Asked for the fp32 ranker's exact top-10 on every list, no int8 attempt passes, and the
    fp32 model itself, which would, is never tried: it is not an int8 ranker. (Session 29's
    demo on an Intel Xeon served static "int8" with all three layers in fp32, chosen as the
    fastest mode, before the gate stopped there.)"""
    metric = _ndcg_metric(setup["lists"], _relevance(setup["fp32_scores"]))
    config = GateConfig(mode="static", min_ratio=1.0, min_same_top_k=1.0)
    lists = _all_real(setup["lists"])
    decision = gate_int8(setup["fp32"], tmp_path, metric, 1.0, setup["calib"], config, lists=lists)
    nodes = quantizable_nodes(setup["fp32"])
    assert not decision.accepted, [(a.ratio, a.same_top_k) for a in decision.attempts]
    assert [len(a.excluded_nodes) for a in decision.attempts] == list(range(len(nodes)))
    assert all(a.same_top_k is not None and a.same_top_k < 1.0 for a in decision.attempts)
    assert list(tmp_path.iterdir()) == []


def test_top10_disagreement_alone_makes_the_gate_fall_back(setup: dict, tmp_path: Path) -> None:
    """Weight-only int8 keeps NDCG but not the fp32 top-10 of enough lists: the gate keeps
    layers in fp32, input layer first, until the top-10 agree.

    Measured, same top-10 set for the 50 lists with 0, 1 and 2 layers in fp32: 92%, 96% on an
    AMD EPYC (AVX-512 VNNI); 90%, 94%, 100% on an Intel Xeon with AMX, whose int8 kernels
    differ; the NDCG ratio passes at every attempt on both.
    """
    metric = _ndcg_metric(setup["lists"], _relevance(_target(setup["lists"])))
    fp32_metric = metric(Scorer(setup["fp32"], sha256_file(setup["fp32"])))
    lists = _all_real(setup["lists"])
    config = GateConfig(mode="weights", min_same_top_k=0.95)
    decision = gate_int8(setup["fp32"], tmp_path, metric, fp32_metric, None, config, lists=lists)

    first = decision.attempts[0]
    assert first.ratio >= 0.99 and first.same_top_k is not None and first.same_top_k < 0.95
    assert not first.passed
    assert decision.accepted and len(decision.attempts) >= 2
    nodes = quantizable_nodes(setup["fp32"])
    for k, attempt in enumerate(decision.attempts):
        assert attempt.excluded_nodes == tuple(nodes[:k])  # input layer first, one more a time
        assert attempt.ratio >= 0.99  # NDCG passes at every attempt: the top-10 alone decide
        assert attempt.same_top_k is not None
        assert attempt.passed == (attempt.same_top_k >= 0.95)
        assert attempt.passed == (k == len(decision.attempts) - 1)  # stops at the first pass
    assert decision.excluded_nodes == decision.attempts[-1].excluded_nodes
    # The gate's number is the share measured against fp32 here, and it meets the bar.
    reference = _scores(setup["fp32"], setup["lists"])
    accepted = _scores(decision.model_path, setup["lists"])
    assert decision.same_top_k == same_top_k(reference, accepted, 10) >= 0.95
    # fp32 through the gate's reference path agrees with itself on every list.
    assert same_top_k(reference, setup["fp32_scores"], 10) == 1.0
    record = json.loads(json.dumps(decision.to_dict()))
    assert record["min_same_top_k"] == 0.95
    assert record["attempts"][0]["same_top_k"] == first.same_top_k


def test_both_marks_are_met_at_equality(setup: dict, tmp_path: Path) -> None:
    """ "At least" both marks: a ratio equal to ``min_ratio`` and a top-10 share equal to
    ``min_same_top_k`` pass."""
    lists = _all_real(setup["lists"])
    flat = GateConfig(mode="weights", min_ratio=0.99, min_same_top_k=0.0)
    decision = gate_int8(setup["fp32"], tmp_path / "a", lambda _: 0.99, 1.0, None, flat)
    assert decision.attempts[0].ratio == 0.99
    assert decision.accepted and len(decision.attempts) == 1
    # The first attempt's share of lists with the fp32 top-10, measured; then asked for.
    strict = GateConfig(mode="weights", min_ratio=0.5, min_same_top_k=1.0)
    probe = gate_int8(setup["fp32"], tmp_path / "b", lambda _: 1.0, 1.0, None, strict, lists=lists)
    share = probe.attempts[0].same_top_k
    assert share is not None and 0 < share < 1.0
    exact = GateConfig(mode="weights", min_ratio=0.99, min_same_top_k=share)
    decision = gate_int8(
        setup["fp32"], tmp_path / "c", lambda _: 1.0, 1.0, None, exact, lists=lists
    )
    assert decision.attempts[0].same_top_k == share
    assert decision.accepted and len(decision.attempts) == 1


def test_rejects_when_even_fp32_misses_the_mark(setup: dict, tmp_path: Path) -> None:
    metric = _ndcg_metric(setup["lists"], _relevance(_target(setup["lists"])))
    # A teacher twice as good as NDCG can be: nothing passes.
    config = GateConfig(mode="dynamic", min_ratio=0.99)
    lists = _all_real(setup["lists"])
    decision = gate_int8(setup["fp32"], tmp_path, metric, 2.0, config=config, lists=lists)
    nodes = quantizable_nodes(setup["fp32"])
    assert not decision.accepted
    assert len(decision.attempts) == len(nodes)
    assert decision.excluded_nodes == tuple(nodes[:-1])  # the last layer stays int8
    assert decision.model_path is None and decision.sha256 is None
    assert list(tmp_path.iterdir()) == []


def test_gate_refuses_to_skip_a_check_it_was_asked_for(setup: dict, tmp_path: Path) -> None:
    metric = _ndcg_metric(setup["lists"], _relevance(_target(setup["lists"])))
    with pytest.raises(ValueError, match="needs reference lists"):
        gate_int8(setup["fp32"], tmp_path, metric, 1.0, setup["calib"], GateConfig())
    with pytest.raises(ValueError, match="static quantization needs calibration"):
        gate_int8(setup["fp32"], tmp_path, metric, 1.0, None, GateConfig(min_same_top_k=0.0))
    assert list(tmp_path.iterdir()) == []


def test_gate_helpers_and_config() -> None:
    assert fallback_sequence(["a", "b", "c"], "first_last") == [(), ("a",), ("a", "b")]
    assert fallback_sequence(["a", "b"], "last_first") == [(), ("b",)]
    assert fallback_sequence(["a"], "first_last") == [()]
    assert quality_ratio(0.297, 0.3) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="teacher_metric=0"):
        quality_ratio(0.5, 0)
    with pytest.raises(ValueError, match=r"GateConfig\.fallback_order='random'"):
        GateConfig(fallback_order="random")
    with pytest.raises(ValueError, match=r"GateConfig\.mode='qat'"):
        GateConfig(mode="qat")
    with pytest.raises(ValueError, match=r"GateConfig\.min_same_top_k=1\.5"):
        GateConfig(min_same_top_k=1.5)
    with pytest.raises(ValueError, match=r"ReferenceLists\.mask"):
        ReferenceLists(np.zeros((2, 20, 3)), np.ones((2, 19), dtype=bool))
    with pytest.raises(ValueError, match=r"ReferenceLists\.k=21"):
        ReferenceLists(np.zeros((2, 20, 3)), np.ones((2, 20), dtype=bool), k=21)
    config = GateConfig(min_ratio=0.98)
    assert GateConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
