"""Export and int8: ONNX fp32 against torch, int8 against fp32 on seeded synthetic lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.export import export_onnx, load_mlp, save_mlp
from slimrank.compression.quantize import (
    QuantConfig,
    fp32_nodes,
    quantizable_nodes,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    torch_dynamic_int8,
)
from slimrank.compression.scorer import Scorer, ScorerConfig
from slimrank.errors import IntegrityError
from slimrank.ranking.mlp import MLPConfig, MLPRanker, fold_standardization

USERS, CANDS, DIM = 50, 200, 16


def _target(x: np.ndarray) -> np.ndarray:
    """A smooth non-linear relevance over the features, ``(..., F) -> (...)``."""
    return np.sin(2 * x[..., 0]) + x[..., 1] * x[..., 2] + 0.5 * x[..., 3] ** 2 - x[..., 4]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A student MLP trained on ``_target``, its fp32 ONNX file, and held-out lists."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(8000, DIM)).astype(np.float32)  # (M, F)
    y_train = _target(x_train).astype(np.float32)
    torch.manual_seed(0)
    model = MLPRanker(MLPConfig(DIM, (64, 32)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lists = rng.normal(size=(USERS, CANDS, DIM)).astype(np.float32)  # (U, N, F)
    with torch.no_grad():
        fp32 = model(torch.from_numpy(lists)).numpy()  # (U, N)
    out = tmp_path_factory.mktemp("quant")
    onnx_path = export_onnx(model, out / "ranker.fp32.onnx", DIM)
    yield {
        "model": model,
        "lists": lists,
        "fp32": fp32,
        "calib": x_train[:2000],
        "onnx": onnx_path,
        "dir": out,
        "mse": float(loss.detach()),
    }
    torch.set_num_threads(threads)


def _score(path: Path, lists: np.ndarray) -> np.ndarray:
    scorer = Scorer(path, sha256_file(path), ScorerConfig(intra_op_threads=1))
    return scorer.score(lists.reshape(-1, DIM)).reshape(lists.shape[:2])  # (U, N)


def _same_top10(a: np.ndarray, b: np.ndarray) -> float:
    """Share of users whose top-10 candidate sets agree, ``(U, N)`` scores each."""
    top = lambda s: np.sort(np.argsort(-s, axis=1)[:, :10], axis=1)  # noqa: E731
    return float(np.mean(np.all(top(a) == top(b), axis=1)))


def test_student_learned_the_target(trained: dict) -> None:
    # Otherwise int8-vs-fp32 agreement below would be about noise, not a ranker.
    target = _target(trained["lists"])
    corr = np.corrcoef(target.ravel(), trained["fp32"].ravel())[0, 1]
    assert corr > 0.95


def test_onnx_fp32_matches_torch(trained: dict) -> None:
    onnx_scores = _score(trained["onnx"], trained["lists"])
    np.testing.assert_allclose(onnx_scores, trained["fp32"], rtol=0, atol=1e-5)
    # The candidate axis is dynamic: 1 and 7 candidates work too.
    scorer = Scorer(trained["onnx"], sha256_file(trained["onnx"]))
    for m in (1, 7):
        x = trained["lists"][0, :m]
        with torch.no_grad():
            expected = trained["model"](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(scorer.score(x), expected, rtol=0, atol=1e-5)


def test_scorer_refuses_a_file_whose_checksum_differs(trained: dict, tmp_path: Path) -> None:
    good = sha256_file(trained["onnx"])
    with pytest.raises(IntegrityError, match="sha256"):
        Scorer(trained["onnx"], "0" * 64)
    tampered = tmp_path / "ranker.onnx"
    tampered.write_bytes(trained["onnx"].read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="does not match"):
        Scorer(tampered, good)
    with pytest.raises(IntegrityError, match="missing"):
        Scorer(tmp_path / "absent.onnx", good)
    scorer = Scorer(trained["onnx"], good.upper())
    with pytest.raises(ValueError, match=r"\(M, 16\)"):
        scorer.score(np.zeros((3, 5), dtype=np.float32))
    assert scorer.score(np.zeros((0, DIM), dtype=np.float32)).shape == (0,)


def test_safetensors_round_trip_and_folded_standardization(trained: dict, tmp_path: Path) -> None:
    model = trained["model"]
    loaded = load_mlp(save_mlp(model, tmp_path / "student.safetensors"))
    x = torch.from_numpy(trained["lists"][0])  # (N, F)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        mean, std = torch.linspace(-1, 1, DIM), torch.linspace(0.5, 2.0, DIM)
        raw = x * std + mean  # features the model would see standardized
        folded = fold_standardization(model, mean, std)
        torch.testing.assert_close(folded(raw), model(x), rtol=0, atol=1e-5)


def _top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each user's fp32 top-10 that is also in the int8 top-10."""
    ta, tb = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb, strict=True)]))


# Stated tolerances, as shares of the fp32 scores' std over all 10,000 candidates. Measured
# here (AVX2 without VNNI, reduce_range=True, per-channel): mean 2.1-2.9%, p99 7.7-10%,
# top-10 overlap 0.97-0.98, identical top-10 sets for 58-74% of users. Identical sets for 95%
# of users is out of reach at int8 on these lists: the median gap between a user's 10th and
# 11th fp32 score is 3.8% of the std, above the mean int8 error, so boundary pairs swap; the
# gate (gate.py) judges such swaps by the pipeline metric instead.
MEAN_ERR_OVER_STD = 0.04
P99_ERR_OVER_STD = 0.15
MIN_TOP10_OVERLAP = 0.95
MIN_SAME_TOP10 = 0.5


def _check_int8(scores: np.ndarray, fp32: np.ndarray) -> None:
    err = np.abs(scores - fp32) / fp32.std()
    assert err.mean() < MEAN_ERR_OVER_STD
    assert np.quantile(err, 0.99) < P99_ERR_OVER_STD
    assert _top10_overlap(scores, fp32) >= MIN_TOP10_OVERLAP
    assert _same_top10(scores, fp32) >= MIN_SAME_TOP10


def test_ort_dynamic_int8_close_to_fp32(trained: dict) -> None:
    path = quantize_onnx_dynamic(trained["onnx"], trained["dir"] / "dyn.onnx")
    assert fp32_nodes(path, quantizable_nodes(trained["onnx"])) == []
    _check_int8(_score(path, trained["lists"]), trained["fp32"])


def test_ort_static_int8_close_to_fp32(trained: dict) -> None:
    path = quantize_onnx_static(trained["onnx"], trained["dir"] / "static.onnx", trained["calib"])
    assert fp32_nodes(path, quantizable_nodes(trained["onnx"])) == []
    _check_int8(_score(path, trained["lists"]), trained["fp32"])


def test_torch_dynamic_int8_close_to_fp32(trained: dict) -> None:
    q = torch_dynamic_int8(trained["model"])
    with torch.no_grad():
        scores = q(torch.from_numpy(trained["lists"])).numpy()
    _check_int8(scores, trained["fp32"])


def test_full_range_u8s8_is_less_accurate_than_reduced_range(trained: dict) -> None:
    """Why ``reduce_range`` defaults to True: on CPUs without VNNI, 8-bit weights saturate."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "vnni" in flags:
        pytest.skip("VNNI CPU: u8s8 kernels do not saturate, so there is nothing to show")
    errors = {}
    for reduce in (True, False):
        path = quantize_onnx_dynamic(
            trained["onnx"], trained["dir"] / f"rr{reduce}.onnx", QuantConfig(reduce_range=reduce)
        )
        errors[reduce] = np.abs(_score(path, trained["lists"]) - trained["fp32"]).mean()
    # Measured here: mean error 0.037 (reduced) vs 0.048 (full range), scores of std 1.7.
    assert errors[True] < errors[False]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_excluded_node_stays_fp32_and_input_layer_dominates_error(trained: dict, mode: str) -> None:
    nodes = quantizable_nodes(trained["onnx"])
    assert len(nodes) == 3
    errors = {}
    for name, exclude in (("none", []), ("first", nodes[:1]), ("last", nodes[-1:])):
        path = trained["dir"] / f"ex-{mode}-{name}.onnx"
        if mode == "static":
            quantize_onnx_static(trained["onnx"], path, trained["calib"], nodes_to_exclude=exclude)
        else:
            quantize_onnx_dynamic(trained["onnx"], path, nodes_to_exclude=exclude)
        assert fp32_nodes(path, nodes) == exclude
        errors[name] = np.abs(_score(path, trained["lists"]) - trained["fp32"]).mean()
    # The measurement behind the gate's first-layer-first fallback order (2.2% -> 0.9% of std).
    assert errors["first"] < 0.6 * errors["none"]
    assert errors["first"] < errors["last"]
    with pytest.raises(ValueError, match="nodes_to_exclude"):
        quantize_onnx_dynamic(trained["onnx"], trained["dir"] / "x.onnx", nodes_to_exclude=["nope"])
