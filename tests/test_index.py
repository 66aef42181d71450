"""The FAISS index stage: recall against exact IndexFlat, tuning, save/load, errors, fallbacks."""

from __future__ import annotations

import dataclasses
import re
import threading

import faiss
import numpy as np
import pytest

from slimrank.data.synthetic import SyntheticConfig, items, queries
from slimrank.errors import DataError
from slimrank.retrieval.index import (
    IndexConfig,
    build_index,
    check_vectors,
    coarse_centroids_of,
    plan_index,
    tune_index,
)
from slimrank.retrieval.index_io import load_index, save_index
from slimrank.retrieval.tuning import TuningConfig, recall_at_k

N, D = 6_000, 32
SYNTH = SyntheticConfig(n_items=N, dim=D, n_clusters=60, seed=3)
TUNING = TuningConfig(n_queries=200, k_factor=(1, 2, 4, 8), nprobe=(1, 2, 4, 8, 16, 32, 64))
CONFIG = IndexConfig(pq_m=16, tuning=TUNING)


@pytest.fixture(scope="module")
def catalog() -> dict[str, np.ndarray]:
    xb = items(SYNTH)  # (N, D)
    tune_q = queries(SYNTH, 200, stream=0)  # (200, D)
    held_out = queries(SYNTH, 300, stream=1)  # (300, D)
    flat = faiss.IndexFlatIP(D)  # the trusted reference
    flat.add(xb)
    _, truth = flat.search(held_out, 100)
    return {"xb": xb, "tune_q": tune_q, "held_out": held_out, "truth": truth}


@pytest.fixture(scope="module")
def default_index(catalog):
    return build_index(catalog["xb"], CONFIG, tune_queries=catalog["tune_q"], progress=False)


def test_default_index_is_ivf_fastscan_with_sq8_refine(default_index) -> None:
    assert default_index.factory_string == "IVF128,PQ16x4fs,Refine(SQ8)"
    assert default_index.ntotal == N
    assert default_index.d == D
    assert set(default_index.params) == {"nprobe", "k_factor_rf"}


def test_tuning_meets_target_on_tuning_and_held_out_queries(default_index, catalog) -> None:
    assert default_index.tuning is not None
    assert default_index.tuning.met_target
    assert default_index.tuning.recall >= TUNING.target
    _, found = default_index.search(catalog["held_out"], 100)
    # Held-out queries come from the same distribution; allow a small generalisation gap.
    assert recall_at_k(found, catalog["truth"], 100) >= TUNING.target - 0.02
    assert recall_at_k(found, catalog["truth"], 10) >= 0.9


def test_plain_ivfpq_recall_floor_and_more_probes_help(catalog) -> None:
    config = dataclasses.replace(
        CONFIG, pq_bits=6, fastscan=False, refine="none", tuning=TuningConfig(enabled=False)
    )
    index = build_index(catalog["xb"], config, progress=False)
    assert index.factory_string == "IVF128,PQ16x6np"
    recalls = []
    for nprobe in (1, 16):
        faiss.extract_index_ivf(index.faiss_index).nprobe = nprobe
        _, found = index.search(catalog["held_out"], 100)
        recalls.append(recall_at_k(found, catalog["truth"], 100))
    assert recalls[1] > recalls[0]
    assert recalls[1] >= 0.6  # PQ16x6 codes at d=32 cap recall@100 below exact


def test_l2_scores_are_minus_squared_distances(catalog) -> None:
    config = dataclasses.replace(CONFIG, metric="l2", refine="flat")
    index = build_index(catalog["xb"], config, tune_queries=catalog["tune_q"], progress=False)
    flat = faiss.IndexFlatL2(D)
    flat.add(catalog["xb"])
    dist, truth = flat.search(catalog["held_out"], 10)
    scores, found = index.search(catalog["held_out"], 10)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert recall_at_k(found, truth, 10) >= 0.95
    agree = found[:, 0] == truth[:, 0]
    np.testing.assert_allclose(scores[agree, 0], -dist[agree, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_returns_identical_results(default_index, catalog, tmp_path, mmap) -> None:
    save_index(default_index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", mmap=mmap)
    assert loaded.params == default_index.params
    assert loaded.factory_string == default_index.factory_string
    assert loaded.config == default_index.config
    want = default_index.search(catalog["held_out"], 50)
    got = loaded.search(catalog["held_out"], 50)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_mmap_load_of_plain_ivfpq_uses_on_disk_lists(catalog, tmp_path) -> None:
    config = dataclasses.replace(CONFIG, fastscan=False, pq_bits=6, refine="none")
    ids = np.arange(N, dtype=np.int64) * 10 + 7
    index = build_index(
        catalog["xb"], config, item_ids=ids, tune_queries=catalog["tune_q"], progress=False
    )
    save_index(index, tmp_path)
    loaded = load_index(tmp_path, mmap=True)
    lists = faiss.extract_index_ivf(loaded.faiss_index).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert faiss.extract_index_ivf(loaded.faiss_index).nprobe == index.params["nprobe"]
    _, found = loaded.search(catalog["held_out"][:20], 5)
    np.testing.assert_array_equal(loaded.ids(found), found * 10 + 7)
    np.testing.assert_array_equal(found, index.search(catalog["held_out"][:20], 5)[1])


def test_tune_index_returns_new_object_with_its_own_params(catalog) -> None:
    config = dataclasses.replace(CONFIG, tuning=TuningConfig(enabled=False))
    index = build_index(catalog["xb"], config, progress=False)
    assert index.params == {} and index.tuning is None
    strict = dataclasses.replace(TUNING, target=0.98, recall_k=10, k_factor=(1, 4, 16, 32))
    tuned = tune_index(index, catalog["xb"], catalog["tune_q"], strict)
    assert index.params == {}
    assert tuned.tuning is not None and tuned.tuning.met_target
    _, found = tuned.search(catalog["tune_q"], 10)
    flat = faiss.IndexFlatIP(D)
    flat.add(catalog["xb"])
    _, truth = flat.search(catalog["tune_q"], 10)
    assert recall_at_k(found, truth, 10) >= 0.98


# --- small catalogs -------------------------------------------------------------------------


def test_small_catalog_plan_shrinks_lists_and_says_why() -> None:
    plan = plan_index(IndexConfig(), 1_682, 64)  # ml-100k items
    assert plan.factory_string == "IVF32,PQ32x4fs,Refine(SQ8)"
    assert plan.nlist * 39 <= 1_682
    assert any("lists" in note for note in plan.notes)


def test_small_catalog_plan_drops_pq_bits_or_goes_flat() -> None:
    pq8 = IndexConfig(pq_bits=8, fastscan=False)
    plan = plan_index(pq8, 1_682, 32)
    assert plan.pq_bits == 5 and "PQ32x5np" in plan.factory_string
    assert 39 * 2**plan.pq_bits <= 1_682
    assert plan_index(IndexConfig(), 800, 64).factory_string == "Flat"
    assert plan_index(IndexConfig(flat_below=0), 600, 64).factory_string == "Flat"
    big = plan_index(IndexConfig(), 1_000_000, 64)
    assert big.factory_string == "IVF4096,PQ32x4fs,Refine(SQ8)" and big.notes == ()


def test_small_catalog_builds_and_meets_target() -> None:
    synth = SyntheticConfig(n_items=1_682, dim=32, n_clusters=20, seed=5)
    xb = items(synth)
    index = build_index(xb, IndexConfig(tuning=TUNING), progress=False)
    assert index.factory_string.startswith("IVF32,")
    assert index.tuning is not None and index.tuning.met_target
    tiny = build_index(xb[:500], IndexConfig(tuning=TUNING), progress=False)
    assert tiny.factory_string == "Flat"
    flat = faiss.IndexFlatIP(32)
    flat.add(xb[:500])
    want = flat.search(xb[:50], 10)
    got = tiny.search(xb[:50], 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


# --- errors ---------------------------------------------------------------------------------


def test_wrong_query_dimension(default_index) -> None:
    with pytest.raises(DataError, match="31 dims, the index has 32"):
        default_index.search(np.zeros((2, 31), np.float32), 5)
    with pytest.raises(DataError, match="2-D"):
        default_index.search(np.zeros(32, np.float32), 5)
    with pytest.raises(ValueError, match="k=0"):
        default_index.search(np.zeros((1, 32), np.float32), 0)


def test_nan_and_inf_are_reported_with_their_row(catalog) -> None:
    bad = catalog["xb"][:2_000].copy()
    bad[1234, 3] = np.nan
    with pytest.raises(DataError, match="row 1234"):
        build_index(bad, CONFIG, progress=False)
    q = np.ones((3, D), np.float32)
    q[2, 0] = np.inf
    with pytest.raises(DataError, match="row 2: queries: NaN or Inf"):
        check_vectors(q, "queries", D)


def test_empty_catalog_and_bad_ids() -> None:
    with pytest.raises(DataError, match="empty"):
        build_index(np.zeros((0, 8), np.float32), CONFIG, progress=False)
    with pytest.raises(DataError, match="empty catalog"):
        plan_index(CONFIG, 0, 8)
    x = np.ones((10, 4), np.float32)
    with pytest.raises(DataError, match="not unique"):
        build_index(x, IndexConfig(kind="flat"), item_ids=np.zeros(10, np.int64))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metric": "cos"}, "metric"),
        ({"kind": "hnsw"}, "kind"),
        ({"pq_bits": 8}, "pq_bits"),  # FastScan needs 4 bits
        ({"refine": "pq"}, "refine"),
        ({"threads": 0}, "threads"),
        ({"nlist": -1}, "nlist"),
        ({"train_points_per_list": 10}, "train_points_per_list"),
        ({"lists_per_sqrt_n": 100.0}, "lists_per_sqrt_n"),
    ],
)
def test_bad_config_field_is_named(kwargs, field) -> None:
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=re.escape(f"IndexConfig.{field}={value!r}")):
        IndexConfig(**kwargs)


def test_pq_m_larger_than_the_dimension_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("IndexConfig.pq_m=32: must be <= the vector")):
        plan_index(IndexConfig(), 100_000, 24)


def test_a_dimension_pq_m_does_not_divide_is_zero_padded(catalog, tmp_path) -> None:
    # 33 dims, as a 32-d two-tower with its item-bias column exports: PQ16 needs a multiple
    # of 16, so the plan pads with zeros, which change no inner product.
    bias = np.linspace(-1, 1, N, dtype=np.float32)[:, None]
    xb = np.hstack([catalog["xb"], bias])  # (N, 33)
    xq = np.hstack([catalog["held_out"], np.ones((len(catalog["held_out"]), 1), np.float32)])
    tune_q = np.hstack([catalog["tune_q"], np.ones((len(catalog["tune_q"]), 1), np.float32)])
    plan = plan_index(CONFIG, N, D + 1)
    assert plan.factory_string == "Pad48,IVF128,PQ16x4fs,Refine(SQ8)"
    assert any("zero-padding the vectors to 48 dims" in note for note in plan.notes)
    index = build_index(xb, CONFIG, tune_queries=tune_q, progress=False)
    assert index.d == D + 1 and index.tuning is not None and index.tuning.met_target
    flat = faiss.IndexFlatIP(D + 1)  # the trusted reference
    flat.add(xb)
    _, truth = flat.search(xq, 100)
    _, found = index.search(xq, 100)
    assert recall_at_k(found, truth, 100) >= TUNING.target - 0.02
    save_index(index, tmp_path / "padded")
    again = load_index(tmp_path / "padded")
    for got, want in zip(again.search(xq, 10), index.search(xq, 10), strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_tuning_config_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("TuningConfig.target=1.5")):
        TuningConfig(target=1.5)
    with pytest.raises(ValueError, match=re.escape("TuningConfig.target=0")):
        TuningConfig(target=0)
    with pytest.raises(ValueError, match=re.escape("TuningConfig.nprobe")):
        TuningConfig(nprobe=(8, 4))


def test_config_round_trips_through_dict() -> None:
    config = IndexConfig(metric="l2", opq=True, tuning=TUNING)
    assert IndexConfig.from_dict(config.to_dict()) == config


def test_recall_at_k_counts_overlap_and_ignores_missing() -> None:
    found = np.array([[1, 2, 3], [4, -1, -1]])
    truth = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k(found, truth, 3) == pytest.approx(3 / 6)
    assert recall_at_k(found, truth, 1) == pytest.approx(1 / 2)


def test_reused_coarse_centroids_skip_kmeans_and_keep_recall(default_index, catalog) -> None:
    centroids = coarse_centroids_of(default_index)
    assert centroids.shape == (128, D)
    config = dataclasses.replace(CONFIG, refine="flat")
    index = build_index(
        catalog["xb"],
        config,
        tune_queries=catalog["tune_q"],
        progress=False,
        coarse_centroids=centroids,
    )
    np.testing.assert_array_equal(coarse_centroids_of(index), centroids)
    _, found = index.search(catalog["held_out"], 100)
    assert recall_at_k(found, catalog["truth"], 100) >= TUNING.target - 0.02
    with pytest.raises(DataError, match="coarse_centroids: shape"):
        build_index(catalog["xb"], config, progress=False, coarse_centroids=centroids[:64])


def test_a_search_from_another_thread_uses_the_configured_openmp_threads(default_index, catalog):
    """OpenMP's thread count is per thread: the server searches from its event loop or a
    handler thread, not the thread that loaded the index, and must still use one thread."""
    seen: dict[str, int] = {}

    def search() -> None:
        seen["before"] = faiss.omp_get_max_threads()
        default_index.search(catalog["held_out"][:1], 10)
        seen["after"] = faiss.omp_get_max_threads()

    thread = threading.Thread(target=search)
    thread.start()
    thread.join()
    if seen["before"] == 1:
        pytest.skip("a new thread starts at one OpenMP thread here (one core or OMP_NUM_THREADS)")
    assert default_index.config.threads == 1
    assert seen["after"] == 1


# --- plan boundaries, missing results, id map and sidecar checks ----------------------------


def test_the_plan_never_asks_for_more_lists_or_pq_bits_than_the_catalog_trains() -> None:
    """Pins the shrink rules at every catalog size: lists and 2**bits codes each get at least
    39 training points, bits never drop below 4 (else Flat), and flat_below is exclusive."""
    for config in (IndexConfig(flat_below=0), IndexConfig(pq_bits=8, fastscan=False, flat_below=0)):
        for n in range(1, 6_000):
            plan = plan_index(config, n, 32)
            if plan.factory_string == "Flat":
                continue
            assert plan.nlist * 39 <= n, (n, plan)
            assert plan.pq_bits >= 4 and 39 * 2**plan.pq_bits <= n, (n, plan)
            assert f"IVF{plan.nlist}," in plan.factory_string
    assert plan_index(IndexConfig(), 999, 64).factory_string == "Flat"
    assert plan_index(IndexConfig(), 1_000, 64).factory_string == "IVF16,PQ32x4fs,Refine(SQ8)"


def test_a_small_k_search_is_the_top_of_a_recall_k_search(default_index, catalog) -> None:
    """Refine's tuned recall holds at recall_k: a k=10 search keeps the top 10 of that search."""
    assert "k_factor_rf" in default_index.params
    small = default_index.search(catalog["held_out"], 10)
    large = default_index.search(catalog["held_out"], TUNING.recall_k)
    np.testing.assert_array_equal(small[1], large[1][:, :10])
    np.testing.assert_array_equal(small[0], large[0][:, :10])


def test_missing_results_are_minus_one_at_minus_inf_and_ids_map_every_row() -> None:
    """Fewer items than k: the tail is index -1 with score -inf; ids() maps row 0 like any row."""
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(5, 4)).astype(np.float32)
    xq = rng.normal(size=(3, 4)).astype(np.float32)
    ids = np.array([10, 11, 12, 13, 14])
    index = build_index(xb, IndexConfig(kind="flat"), item_ids=ids, progress=False)
    scores, found = index.search(xq, 7)
    want = np.argsort(-(xq @ xb.T), axis=1)  # (3, 5) brute force, best first
    np.testing.assert_array_equal(found[:, :5], want)
    np.testing.assert_allclose(scores[:, :5], np.take_along_axis(xq @ xb.T, want, 1), rtol=1e-5)
    assert (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    np.testing.assert_array_equal(index.ids(found), np.where(found < 0, -1, ids[found]))
    np.testing.assert_array_equal(index.ids(np.array([0, 4, -1])), [10, 14, -1])


def test_float_item_ids_and_tuning_vectors_of_another_catalog_are_refused(catalog) -> None:
    """Ids must be integers; tune_index needs exactly the indexed vectors."""
    x = np.ones((10, 4), np.float32)
    with pytest.raises(DataError, match="expected integers"):
        build_index(x, IndexConfig(kind="flat"), item_ids=np.arange(10) + 0.5)
    config = dataclasses.replace(CONFIG, kind="ivfflat", tuning=TuningConfig(enabled=False))
    index = build_index(catalog["xb"], config, progress=False)
    with pytest.raises(DataError, match=f"{N - 1} rows, the index holds {N}"):
        tune_index(index, catalog["xb"][:-1], catalog["tune_q"], TUNING)


def test_tuning_can_choose_to_probe_every_list() -> None:
    """nprobe = nlist (exhaustive) is in the grid, so a recall target of 1.0 is reachable."""
    rng = np.random.default_rng(7)
    xb = rng.normal(size=(2_000, 16)).astype(np.float32)  # no clusters: no list is enough alone
    xq = rng.normal(size=(100, 16)).astype(np.float32)
    tuning = TuningConfig(recall_k=10, target=1.0, nprobe=(1, 2, 4, 8, 16, 32))
    index = build_index(xb, IndexConfig(kind="ivfflat", nlist=32, tuning=tuning), tune_queries=xq)
    assert index.tuning is not None and index.tuning.met_target
    flat = faiss.IndexFlatIP(16)
    flat.add(xb)
    _, truth = flat.search(xq, 10)
    _, found = index.search(xq, 10)
    assert recall_at_k(found, truth, 10) == 1.0


def test_a_sidecar_of_another_format_or_size_is_refused(catalog, tmp_path) -> None:
    """load_index checks format_version and that the FAISS file holds the sidecar's ntotal."""
    import json

    index = build_index(catalog["xb"][:500], IndexConfig(kind="flat"), progress=False)
    save_index(index, tmp_path)
    sidecar = tmp_path / "index.json"
    meta = json.loads(sidecar.read_text())
    for key, value, message in (
        ("format_version", 2, "format_version 2, expected 1"),
        ("ntotal", 499, "ntotal=499"),
        ("d", D + 1, f"d={D + 1}"),
    ):
        sidecar.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(DataError, match=message):
            load_index(tmp_path)
