"""Export and int8: ONNX fp32 against torch; int8 against fp32 on seeded and mined lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_pipeline import tiny_pipeline

from slimrank.bundle import open_bundle
from slimrank.bundle.checksums import sha256_file
from slimrank.compression.agreement import same_top_k
from slimrank.compression.export import export_onnx, load_mlp, save_mlp
from slimrank.compression.gate import quantize
from slimrank.compression.quantize import (
    CandidateReader,
    QuantConfig,
    fp32_nodes,
    int8_weight,
    quantizable_nodes,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_onnx_weights,
    torch_dynamic_int8,
)
from slimrank.compression.scorer import Scorer, ScorerConfig, score_lists
from slimrank.errors import IntegrityError
from slimrank.pipeline.artifacts import VIEWS, CandidatesArtifact
from slimrank.pipeline.run import run_pipeline
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


def test_exported_bytes_do_not_depend_on_the_checkout(trained: dict, tmp_path: Path) -> None:
    """No build path or exporter note ships in a ranker: the same model gives the same bytes."""
    import slimrank

    checkout = str(Path(slimrank.__file__).resolve().parent.parent).encode()
    again = export_onnx(trained["model"], tmp_path / "elsewhere" / "ranker.onnx", DIM)
    int8 = quantize_onnx_weights(trained["onnx"], tmp_path / "ranker.int8.onnx")
    assert again.read_bytes() == trained["onnx"].read_bytes()
    for path in (trained["onnx"], int8):
        data = path.read_bytes()
        assert checkout not in data and b"stack_trace" not in data and b"pkg.torch" not in data
        graph = onnx.load(str(path)).graph
        notes = [v.metadata_props for v in (*graph.node, *graph.input, *graph.output)]
        notes += [v.metadata_props for v in (*graph.value_info, *graph.initializer)]
        assert not graph.metadata_props and not any(notes)


def _score(path: Path, lists: np.ndarray) -> np.ndarray:
    scorer = Scorer(path, sha256_file(path), ScorerConfig(intra_op_threads=1))
    return scorer.score(lists.reshape(-1, DIM)).reshape(lists.shape[:2])  # (U, N)


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
    threads = Scorer(trained["onnx"], good, ScorerConfig(2, 3)).session.get_session_options()
    assert (threads.intra_op_num_threads, threads.inter_op_num_threads) == (2, 3)


def test_score_lists_scores_each_list_in_its_own_call(trained: dict) -> None:
    """Dynamic int8 takes one activation range per call: a list scored among lists on a
    larger scale would round differently. The reference is a plain loop of score calls."""
    path = quantize_onnx_dynamic(trained["onnx"], trained["dir"] / "dyn.onnx")
    scorer = Scorer(path, sha256_file(path), ScorerConfig(intra_op_threads=1))
    lists = trained["lists"][:3] * np.array([1.0, 20.0, 0.05], np.float32)[:, None, None]
    got = score_lists(scorer, lists)
    want = np.stack([scorer.score(x) for x in lists])
    np.testing.assert_array_equal(got, want)
    assert score_lists(scorer, np.zeros((0, 4, DIM), np.float32)).shape == (0, 4)


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


# Stated tolerances on the toy student above (standard-normal features), as shares of the fp32
# scores' std over all 10,000 candidates. Measured here (AVX2 without VNNI, reduce_range=True,
# per-channel): static and dynamic mean 2.0-2.9%, p99 7.4-10%; weight-only mean 0.9%, p99 3.3%.
# The top-10 requirement is checked on pipeline candidates below, not on these lists.
MEAN_ERR_OVER_STD = 0.04
P99_ERR_OVER_STD = 0.15


def _check_int8(scores: np.ndarray, fp32: np.ndarray) -> None:
    err = np.abs(scores - fp32) / fp32.std()
    assert err.mean() < MEAN_ERR_OVER_STD
    assert np.quantile(err, 0.99) < P99_ERR_OVER_STD


def test_ort_dynamic_int8_close_to_fp32(trained: dict) -> None:
    path = quantize_onnx_dynamic(trained["onnx"], trained["dir"] / "dyn.onnx")
    assert fp32_nodes(path, quantizable_nodes(trained["onnx"])) == []
    _check_int8(_score(path, trained["lists"]), trained["fp32"])


def test_ort_static_int8_close_to_fp32(trained: dict) -> None:
    path = quantize_onnx_static(trained["onnx"], trained["dir"] / "static.onnx", trained["calib"])
    assert fp32_nodes(path, quantizable_nodes(trained["onnx"])) == []
    _check_int8(_score(path, trained["lists"]), trained["fp32"])


def test_weight_only_int8_close_to_fp32_and_stored_as_int8(trained: dict) -> None:
    path = quantize_onnx_weights(trained["onnx"], trained["dir"] / "weights.onnx")
    assert fp32_nodes(path, quantizable_nodes(trained["onnx"])) == []
    graph = onnx.load(str(path)).graph
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # Every Linear weight is an int8 tensor now; no fp32 copy of it is left in the file.
    source = onnx.load(str(trained["onnx"])).graph.initializer
    weights = [t.name for t in source if len(t.dims) == 2]
    assert len(weights) == 3
    for name in weights:
        assert name not in stored
        assert stored[f"{name}_quantized"].dtype == np.int8
    _check_int8(_score(path, trained["lists"]), trained["fp32"])


def test_int8_weight_rounding_is_within_half_a_step() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 5)).astype(np.float32)  # (N, K), Gemm with transB=1
    w[2] = 0.0  # a unit removed by structured pruning
    w[4, 1:] = 0.0  # weights removed by magnitude pruning
    q, scale = int8_weight(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (8,)
    assert np.abs(q).max() == 127  # full range: each row's largest weight is +-127
    assert np.all(np.abs(q * scale[:, None] - w) <= scale[:, None] / 2 + 1e-7)
    assert np.all(q[w == 0] == 0)  # pruned zeros stay exact zeros
    assert scale[2] == 1.0
    _, scale_t = int8_weight(w, axis=None)
    assert scale_t.shape == () and scale_t == np.abs(w).max() / 127


def _hand_graph(path: Path) -> dict[str, np.ndarray]:
    """Write ``features (M, 3) -> scores (M,)`` through MatMul, Gemm transB=1, Gemm transB=0
    and a MatMul with a 1-D weight; each 2-D weight's output channels differ in size 10x."""
    rng = np.random.default_rng(7)
    w = {
        "w1": rng.normal(size=(3, 5)) * 10.0 ** np.arange(5)[None, :],  # (K, N) MatMul
        "w2": rng.normal(size=(4, 5)) * 10.0 ** np.arange(4)[:, None],  # (N, K) transB=1
        "w3": rng.normal(size=(4, 2)) * 10.0 ** np.arange(2)[None, :],  # (K, N) no transB
        "w4": rng.normal(size=(2,)),  # 1-D: not a 2-D initializer, stays fp32
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        onnx.helper.make_node("MatMul", ["features", "w1"], ["h1"], name="mm1"),
        onnx.helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="gemm_t", transB=1),
        onnx.helper.make_node("Gemm", ["h2", "w3"], ["h3"], name="gemm_n"),  # transB 0
        onnx.helper.make_node("MatMul", ["h3", "w4"], ["scores"], name="mm_vec"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "hand",
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["M", 3])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["M"])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_weight_only_int8_scales_each_output_channel_of_each_weight_layout(
    tmp_path: Path,
) -> None:
    import onnxruntime as ort

    w = _hand_graph(tmp_path / "hand.onnx")
    path = quantize_onnx_weights(tmp_path / "hand.onnx", tmp_path / "hand.int8.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    # The output channel is a column of a (K, N) weight and a row of a transposed (N, K) one:
    # one scale per channel, and each channel's largest weight maps to +-127.
    for name, axis in (("w1", 1), ("w2", 0), ("w3", 1)):
        q, scale = stored[f"{name}_quantized"], stored[f"{name}_scale"]
        assert scale.shape == (w[name].shape[axis],)
        peak = np.abs(q.astype(np.int16)).max(axis=1 - axis)
        assert peak.tolist() == [127] * w[name].shape[axis]
        np.testing.assert_allclose(scale, np.abs(w[name]).max(axis=1 - axis) / 127, rtol=1e-6)
    assert "w4_quantized" not in stored and stored["w4"].dtype == np.float32
    assert fp32_nodes(path, quantizable_nodes(tmp_path / "hand.onnx")) == ["mm_vec"]
    x = np.random.default_rng(8).normal(size=(20, 3)).astype(np.float32)
    reference = ((x @ w["w1"]) @ w["w2"].T @ w["w3"]) @ w["w4"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"features": x})
    # Per-channel steps are 1/254 of each channel's range: well under 2% of the scores' spread.
    assert np.abs(scores - reference).max() < 0.02 * reference.std()

    # per_channel=False: one scale per tensor, so the small channels use only a few levels.
    path = quantize_onnx_weights(
        tmp_path / "hand.onnx", tmp_path / "hand.t.onnx", QuantConfig(per_channel=False)
    )
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert stored["w1_scale"].shape == ()
    assert stored["w1_scale"] == pytest.approx(np.abs(w["w1"]).max() / 127, rel=1e-6)
    assert np.abs(stored["w1_quantized"][:, 0].astype(np.int16)).max() < 2


def test_calibration_reader_feeds_equal_batches_and_rewinds() -> None:
    features = np.arange(30, dtype=np.float32).reshape(10, 3)
    reader = CandidateReader(features, batch=4)
    first = [b["features"] for b in iter(reader.get_next, None)]
    assert [len(b) for b in first] == [4, 4]  # the last 2 rows are dropped, not a short batch
    np.testing.assert_array_equal(np.concatenate(first), features[:8])
    reader.rewind()
    assert [len(b["features"]) for b in iter(reader.get_next, None)] == [4, 4]
    # Fewer rows than the batch: one batch of all of them.
    small = CandidateReader(features[:5], batch=256)
    assert [len(b["features"]) for b in iter(small.get_next, None)] == [5]


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


def _int8_weights(path: Path) -> list[np.ndarray]:
    """Return the stored int8 weight matrices of a quantized ONNX graph."""
    arrays = (numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer)
    return [a for a in arrays if a.dtype == np.int8 and a.ndim == 2]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_reduce_range_stores_7_bit_weights_and_full_range_8_bit(trained: dict, mode: str) -> None:
    """What ``reduce_range`` does, read from the stored weights, so it holds on any CPU."""
    largest = {}
    for reduce in (True, False):
        path = trained["dir"] / f"range-{mode}-{reduce}.onnx"
        config = QuantConfig(reduce_range=reduce)
        quantize(mode, trained["onnx"], path, trained["calib"], config, ())
        weights = _int8_weights(path)
        assert len(weights) == len(quantizable_nodes(trained["onnx"]))
        largest[reduce] = [int(np.abs(w.astype(np.int16)).max()) for w in weights]
    # Symmetric per-channel int8: each layer's largest weight maps to the end of the range.
    assert largest[True] == [64] * len(largest[True])  # reduce_range: [-64, 64], 7 bits
    assert largest[False] == [127] * len(largest[False])  # the full [-127, 127]
    assert QuantConfig().reduce_range is True  # what the pipeline's gate uses


@pytest.mark.parametrize("mode", ["static", "dynamic", "weights"])
def test_excluded_node_stays_fp32_and_input_layer_dominates_error(trained: dict, mode: str) -> None:
    nodes = quantizable_nodes(trained["onnx"])
    assert len(nodes) == 3
    errors = {}
    for name, exclude in (("none", []), ("first", nodes[:1]), ("last", nodes[-1:])):
        path = trained["dir"] / f"ex-{mode}-{name}.onnx"
        quantize(mode, trained["onnx"], path, trained["calib"], QuantConfig(), tuple(exclude))
        assert fp32_nodes(path, nodes) == exclude
        errors[name] = np.abs(_score(path, trained["lists"]) - trained["fp32"]).mean()
    # The measurement behind the gate's first-layer-first fallback order. On an AMD EPYC (AVX-512
    # VNNI) the input layer in fp32 took the mean error from 2.2% to 0.9% of the scores' std
    # (static) and from 0.9% to 0.3% (weights); on an Intel Xeon with AMX, to 0.63x, 0.62x and
    # 0.45x of the fully int8 error (static, dynamic, weights), the last layer to 0.87x-0.96x.
    assert errors["first"] < 0.7 * errors["none"]
    assert errors["first"] < errors["last"]
    with pytest.raises(ValueError, match="nodes_to_exclude"):
        quantize(
            mode,
            trained["onnx"],
            trained["dir"] / "x.onnx",
            trained["calib"],
            QuantConfig(),
            ("nope",),
        )


# -- int8 against fp32 on candidates the pipeline mined (tests/tiny_pipeline.py) ---------------
#
# The tiny pipeline's synthetic catalog goes through the real candidate mining and feature
# assembly (scores, ranks, co-occurrence, one-hots, embeddings; 66 features, 30 candidates per
# list, 200 lists over its three views), and its pruned student is the fp32 reference.
# Requirement (issue 4): int8 scores within a stated tolerance of fp32, and the same top-10
# SET (order not required) as fp32 for at least 95% of the lists.
# Measured here for the weight-only int8 the pipeline ships: mean |int8 - fp32| 0.21% of the
# fp32 std, p99 0.9%, same top-10 set for 98.5% of lists (same order 93.5%). Static int8 (8-bit
# activations) on the same lists: mean 0.9%, p99 3.6%, same set 92% (dynamic 95.5%). On
# ml-100k's real candidates (943 users x 200, test view): weight-only 98.9%, static 86%,
# dynamic 89%.
WEIGHTS_MEAN_ERR_OVER_STD = 0.005
WEIGHTS_P99_ERR_OVER_STD = 0.02
MIN_SAME_TOP10 = 0.95


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny pipeline's candidate lists of every view, its fp32 pruned student's scores."""
    run = tiny_pipeline(tmp_path_factory)
    result = run_pipeline(run.config)  # every step cached by tiny_pipeline
    views = CandidatesArtifact.load(result.path("candidates")).views
    feats = [views[v][1] for v in VIEWS]
    features = np.concatenate([f.values for f in feats])  # (U, N, F)
    mask = np.concatenate([f.mask for f in feats])  # (U, N)
    src = result.path("student_pruned") / "model.onnx"
    train = views["train"][1]
    rows = train.values[train.mask]  # (M, F), as the int8 step calibrates
    pick = np.random.default_rng(0).choice(len(rows), min(len(rows), 512), replace=False)
    return {
        "features": features,
        "mask": mask,
        "src": src,
        "fp32": _score_lists(src, features),
        "calib": rows[np.sort(pick)],
        "dir": tmp_path_factory.mktemp("mined"),
        "bundle_ranker": open_bundle(run.bundles, run.version).file("ranker.onnx"),
    }


def _score_lists(path: Path, features: np.ndarray) -> np.ndarray:
    scorer = Scorer(path, sha256_file(path), ScorerConfig(intra_op_threads=1))
    return score_lists(scorer, features)  # (U, N), one call per list as served


def _errors(scores: np.ndarray, mined: dict) -> np.ndarray:
    fp32 = mined["fp32"][mined["mask"]]
    return np.abs(scores[mined["mask"]] - fp32) / fp32.std()


def test_mined_lists_are_realistic_for_the_top10_question(mined: dict) -> None:
    # Enough lists for a 95% bar to mean something, and the 10th/11th fp32 scores as close as
    # on real lists: a median gap of a few % of the std (ml-100k: 2.2%; here 5.2%).
    features, mask, fp32 = mined["features"], mined["mask"], mined["fp32"]
    assert len(features) >= 100 and mask.sum(axis=1).min() > 10
    ranked = -np.sort(-np.where(mask, fp32, -np.inf), axis=1)  # (U, N)
    gap = (ranked[:, 9] - ranked[:, 10]) / fp32[mask].std()
    assert np.median(gap) < 0.1


def test_weight_only_int8_keeps_the_fp32_top10_on_mined_candidates(mined: dict) -> None:
    path = quantize_onnx_weights(mined["src"], mined["dir"] / "weights.onnx")
    scores = _score_lists(path, mined["features"])
    err = _errors(scores, mined)
    assert err.mean() < WEIGHTS_MEAN_ERR_OVER_STD
    assert np.quantile(err, 0.99) < WEIGHTS_P99_ERR_OVER_STD
    assert same_top_k(mined["fp32"], scores, 10, mined["mask"]) >= MIN_SAME_TOP10


def test_the_published_int8_ranker_keeps_the_fp32_top10(mined: dict) -> None:
    """End to end: the bundle's gated ranker against the pipeline's fp32 pruned student."""
    scores = _score_lists(mined["bundle_ranker"], mined["features"])
    assert same_top_k(mined["fp32"], scores, 10, mined["mask"]) >= MIN_SAME_TOP10
    assert _errors(scores, mined).mean() < WEIGHTS_MEAN_ERR_OVER_STD


def test_activation_quantization_is_what_moves_the_scores(mined: dict) -> None:
    """Static int8 quantizes activations to 8 bits as well; that, not the weights, is the error."""
    weights = quantize_onnx_weights(mined["src"], mined["dir"] / "w.onnx")
    static = quantize_onnx_static(mined["src"], mined["dir"] / "s.onnx", mined["calib"])
    err_w = _errors(_score_lists(weights, mined["features"]), mined).mean()
    err_s = _errors(_score_lists(static, mined["features"]), mined).mean()
    # Measured: 0.21% vs 0.93% of the std; static stays within the toy model's tolerance.
    assert err_w < 0.5 * err_s
    assert err_s < MEAN_ERR_OVER_STD


def test_weight_only_scores_do_not_depend_on_the_other_candidates(mined: dict) -> None:
    """A list scored alone or beside another list gets the same scores; dynamic int8 does not.

    Dynamic quantization takes one activation range per call, so a server scoring one request
    per call gives other scores than an evaluation scoring every list at once.
    """
    one = mined["features"][0]  # (N, F)
    # Beside it, another list with features 50x larger: a far wider activation range.
    two = np.concatenate([one, 50 * mined["features"][1]])  # (2N, F)
    weights = quantize_onnx_weights(mined["src"], mined["dir"] / "alone-w.onnx")
    dynamic = quantize_onnx_dynamic(mined["src"], mined["dir"] / "alone-d.onnx")
    for path, same in ((mined["src"], True), (weights, True), (dynamic, False)):
        scorer = Scorer(path, sha256_file(path))
        alone, beside = scorer.score(one), scorer.score(two)[: len(one)]
        assert np.array_equal(alone, beside) == same, path.name
