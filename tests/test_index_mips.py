"""The MIPS-to-L2 transform in the index: recall against exact inner-product search where norms
vary widely, recovered scores, tuning, save/load and the plan.

The catalog has the shape of a two-tower's items at scale: most vectors short and clustered,
a few percent 10-100x longer (popular items) that hold most of the top inner products.
"""

from __future__ import annotations

import json
import re

import faiss
import numpy as np
import pytest

from slimrank.errors import DataError
from slimrank.retrieval.index import IndexConfig, build_index, plan_index
from slimrank.retrieval.index_io import load_index, read_transform, save_index
from slimrank.retrieval.mips import augment_items, augment_queries, inner_products, max_norm
from slimrank.retrieval.tuning import TuningConfig, apply_params, recall_at_k, search_params_of

N, D, K = 20_000, 15, 50  # D + 1 = 16 dims after the transform: PQ8 needs no padding
OFF = TuningConfig(enabled=False)


@pytest.fixture(scope="module")
def catalog() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, D))
    xb = centers[rng.integers(0, 40, N)] + 0.5 * rng.normal(size=(N, D))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    norms = np.full(N, 0.1)
    long = rng.random(N) < 0.03
    norms[long] = rng.uniform(1.0, 10.0, long.sum())
    xb = (xb * norms[:, None]).astype(np.float32)  # (N, D)
    tune_q = (centers[rng.integers(0, 40, 200)] + 0.5 * rng.normal(size=(200, D))).astype("f4")
    xq = (centers[rng.integers(0, 40, 300)] + 0.5 * rng.normal(size=(300, D))).astype("f4")
    flat = faiss.IndexFlatIP(D)  # the trusted reference: exact inner-product search
    flat.add(xb)
    _, truth = flat.search(xq, K)
    return {"xb": xb, "tune_q": tune_q, "xq": xq, "truth": truth}


def _recall_at(index, catalog, nprobe: int, k_factor: int = 4) -> float:
    names = search_params_of(index.faiss_index)
    apply_params(
        index.faiss_index,
        {"nprobe": nprobe, "k_factor_rf": k_factor}
        if "k_factor_rf" in names
        else {"nprobe": nprobe},
    )
    _, found = index.search(catalog["xq"], K)
    return recall_at_k(found, catalog["truth"], K)


@pytest.mark.parametrize(
    ("kind", "refine"), [("ivfpq", "sq8"), ("ivfpq", "flat"), ("ivfflat", "none")]
)
def test_the_transform_finds_the_largest_inner_products_at_few_lists(
    catalog, kind: str, refine: str
) -> None:
    plain = build_index(catalog["xb"], IndexConfig(kind=kind, pq_m=8, refine=refine, tuning=OFF))
    config = IndexConfig(kind=kind, pq_m=8, refine=refine, transform="mips_l2", tuning=OFF)
    mips = build_index(catalog["xb"], config, progress=False)
    assert mips.transform == "mips_l2" and mips.d == D and mips.faiss_index.d == D + 1
    assert plain.transform == "none" and plain.faiss_index.d == D
    # 32 of 512 lists: over inner product the long vectors sit in lists whose centroids do
    # not point at the query; over the transform the lists and the probe share the metric.
    assert mips.factory_string.startswith("IVF512,")
    got, before = _recall_at(mips, catalog, 32), _recall_at(plain, catalog, 32)
    assert got >= 0.95 > 0.6 > before


def test_recovered_scores_are_the_inner_products_within_the_codes_error(catalog) -> None:
    xb, xq = catalog["xb"], catalog["xq"]
    for refine in ("flat", "sq8"):
        config = IndexConfig(pq_m=8, refine=refine, transform="mips_l2", tuning=OFF)
        index = build_index(xb, config, progress=False)
        apply_params(index.faiss_index, {"nprobe": 64, "k_factor_rf": 4})
        scores, found = index.search(xq, K)  # (Q, K)
        assert (found >= 0).all()
        exact = np.einsum("qd,qkd->qk", xq.astype(np.float64), xb[found].astype(np.float64))
        norm = index.mips_norm
        assert norm == pytest.approx(np.linalg.norm(xb, axis=1).max(), rel=1e-6)
        # What the refine stage stores of each transformed item, decoded: x' + e.
        refine_index = faiss.downcast_index(index.faiss_index).refine_index
        stored = refine_index.reconstruct_n(0, N).astype(np.float64)  # (N, D + 1)
        err = np.linalg.norm(stored - augment_items(xb, norm), axis=1)  # |e| per item
        q_norm = np.linalg.norm(xq, axis=1)[:, None]
        # recovered - q.x = q'.e - x'.e - |e|^2 / 2  (|x'| = norm), plus float32 rounding.
        bound = err[found] * (q_norm + norm + err[found] / 2) + 1e-5 * (norm**2 + q_norm**2)
        assert (np.abs(scores - exact) <= bound).all()
        if refine == "flat":  # exact codes: the inner products themselves
            np.testing.assert_allclose(scores, exact, atol=1e-4 * norm**2)
        else:
            assert err.max() > 1e-3  # SQ8 is lossy, so the bound above is not vacuous


def test_the_transform_is_tuned_against_exact_inner_product_search(catalog) -> None:
    tuning = TuningConfig(recall_k=K, target=0.95, n_queries=200, nprobe=(1, 2, 4, 8, 16, 32, 64))
    common = {"kind": "ivfflat", "tuning": tuning}
    mips = build_index(
        catalog["xb"], IndexConfig(transform="mips_l2", **common), tune_queries=catalog["tune_q"]
    )
    plain = build_index(catalog["xb"], IndexConfig(**common), tune_queries=catalog["tune_q"])
    assert mips.tuning.met_target and mips.tuning.recall >= 0.95
    _, found = mips.search(catalog["xq"], K)
    assert recall_at_k(found, catalog["truth"], K) >= 0.93  # held out: a small gap allowed
    # Plain IVF needs more lists probed for the same target (or does not reach it).
    assert not plain.tuning.met_target or plain.params["nprobe"] > mips.params["nprobe"]


def test_a_transformed_index_saves_and_loads_with_its_norm(catalog, tmp_path) -> None:
    config = IndexConfig(kind="ivfflat", transform="mips_l2", tuning=OFF)
    index = build_index(catalog["xb"], config, progress=False)
    apply_params(index.faiss_index, {"nprobe": 16})
    index.params["nprobe"] = 16
    save_index(index, tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["transform"] == {"kind": "mips_l2", "max_norm": index.mips_norm}
    assert meta["d"] == D and read_transform(tmp_path / "idx") == index.mips_norm
    again = load_index(tmp_path / "idx")
    assert again.mips_norm == index.mips_norm and again.d == D
    for got, want in zip(
        again.search(catalog["xq"], 10), index.search(catalog["xq"], 10), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    meta["transform"] = {"kind": "mips_l2", "max_norm": 0}
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=re.escape("transform['max_norm'] = 0")):
        load_index(tmp_path / "idx")


def test_an_index_json_without_a_transform_loads_as_before(catalog, tmp_path) -> None:
    index = build_index(catalog["xb"], IndexConfig(kind="ivfflat", tuning=OFF), progress=False)
    save_index(index, tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    del meta["transform"]  # as written before the transform existed
    meta["config"].pop("transform")
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    again = load_index(tmp_path / "idx")
    assert again.mips_norm is None and again.d == D


def test_the_plan_counts_the_extra_dimension_and_exact_search_skips_it() -> None:
    config = IndexConfig(pq_m=32, transform="mips_l2")
    plan = plan_index(config, 600_000, 64)  # 64 + 1 = 65 dims: padded to 96 for PQ32
    assert plan.factory_string == "Pad96,IVF4096,PQ32x4fs,Refine(SQ8)"
    assert plan.transform == "mips_l2"
    flat = plan_index(IndexConfig(kind="ivfflat", transform="mips_l2"), 600_000, 64)
    assert (flat.factory_string, flat.transform) == ("IVF4096,Flat", "mips_l2")
    small = plan_index(config, 500, 64)  # under flat_below: exact search, no transform
    assert small.factory_string == "Flat" and small.transform == "none"
    assert any("exact search needs no MIPS-to-L2 transform" in n for n in small.notes)
    index = build_index(np.eye(40, 8, dtype=np.float32), config, progress=False)
    assert index.transform == "none" and index.mips_norm is None


def test_the_transform_is_for_inner_product_and_named_when_wrong() -> None:
    with pytest.raises(ValueError, match=re.escape("IndexConfig.transform='mips_l2'")):
        IndexConfig(metric="l2", transform="mips_l2")
    with pytest.raises(ValueError, match=re.escape("IndexConfig.transform='mips'")):
        IndexConfig(transform="mips")


def test_the_pure_functions_make_l2_distance_rank_by_inner_product() -> None:
    rng = np.random.default_rng(1)
    xb = (rng.normal(size=(500, 6)) * rng.uniform(0.01, 5, (500, 1))).astype(np.float32)
    xq = rng.normal(size=(20, 6)).astype(np.float32)
    norm = max_norm(xb)
    xb2, xq2 = augment_items(xb, norm), augment_queries(xq)
    np.testing.assert_allclose(np.linalg.norm(xb2, axis=1), norm, rtol=1e-5)
    dist = ((xq2[:, None, :] - xb2[None]) ** 2).sum(-1)  # (20, 500)
    np.testing.assert_allclose(inner_products(xq, dist, norm), xq @ xb.T, atol=1e-4 * norm**2)
    with pytest.raises(ValueError, match="exceeds the transform's max_norm"):
        augment_items(xb, norm / 2)


def test_describe_index_names_the_factory_and_the_transform_and_a_bad_sidecar(
    catalog, tmp_path
) -> None:
    from slimrank.retrieval.index_io import describe_index

    for transform in ("", "mips_l2"):
        config = IndexConfig(kind="ivfflat", transform=transform or "none", tuning=OFF)
        index = build_index(catalog["xb"][:2000], config, progress=False)
        save_index(index, tmp_path / f"idx{transform}")
    assert describe_index(tmp_path / "idx") == load_index(tmp_path / "idx").factory_string
    assert describe_index(tmp_path / "idxmips_l2") == (
        load_index(tmp_path / "idxmips_l2").factory_string + " over the MIPS-to-L2 transform"
    )
    sidecar = tmp_path / "idx" / "index.json"
    meta = json.loads(sidecar.read_text())
    del meta["factory_string"]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="factory_string") as err:
        describe_index(tmp_path / "idx")
    assert "index.json" in str(err.value)
    sidecar.write_text("{not json")
    with pytest.raises(DataError, match=re.escape("index.json")):
        describe_index(tmp_path / "idx")
    with pytest.raises(DataError, match=re.escape("index.json")):
        describe_index(tmp_path / "missing")


def test_max_norm_reads_every_row_of_every_chunk() -> None:
    """max_norm is the largest row norm, whichever row and chunk holds it (a plain loop)."""
    rng = np.random.default_rng(2)
    xb = rng.normal(size=(10, 3)).astype(np.float32)
    for row in (0, 3, 9):
        x = xb.copy()
        x[row] *= 10
        want = max(float(np.linalg.norm(v.astype(np.float64))) for v in x)
        for chunk in (1, 3, 100):
            assert max_norm(x, chunk=chunk) == pytest.approx(want, rel=1e-9)


def test_a_transform_record_with_an_unknown_field_is_refused() -> None:
    """parse_transform accepts exactly kind and max_norm; anything else is named."""
    from slimrank.retrieval.mips import parse_transform

    assert parse_transform({"kind": "mips_l2", "max_norm": 2}, "t") == 2.0
    assert parse_transform({"kind": "none"}, "t") is None
    with pytest.raises(ValueError, match=re.escape("t: unknown field(s) ['scale']")):
        parse_transform({"kind": "mips_l2", "max_norm": 2.0, "scale": 1}, "t")
