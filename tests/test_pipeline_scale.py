"""configs/scale.toml, shrunk to a 2,000-user world, end to end: generate the world, run every
step through the logs directory, publish, and serve the bundle with the real server.

Only sizes change (epochs, widths, sample sizes, the source); every option scale.toml sets
(sampled softmax, local EASE, user samples, the tuned IVF index over the MIPS-to-L2
transform) is what runs here.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from served_store import serving

from slimrank.bundle import Bundle, open_bundle
from slimrank.bundle.formats import read_npy
from slimrank.compression.scorer import Scorer
from slimrank.config import ConfigError
from slimrank.data.world import WorldConfig, write_world
from slimrank.pipeline.artifacts import (
    DataArtifact,
    EmbeddingsArtifact,
    IndexArtifact,
    TeacherArtifact,
    TwoTowerArtifact,
    load_view,
)
from slimrank.pipeline.config import PipelineConfig
from slimrank.pipeline.publish import publish_run
from slimrank.pipeline.run import RunResult, run_pipeline
from slimrank.pipeline.steps import candidates_step, teacher_model_config
from slimrank.ranking.candidates import fold_item_history
from slimrank.ranking.features import FeatureTables, build_feature_tables, candidate_features
from slimrank.ranking.pipeline_eval import rank_candidates
from slimrank.ranking.teacher import DCNv2, teacher_scores
from slimrank.retrieval.train import train_two_tower
from slimrank.serving.client import SlimrankClient
from slimrank.serving.pipeline_loader import load_served_index, load_spec

SCALE = Path(__file__).resolve().parent.parent / "configs" / "scale.toml"
WORLD = WorldConfig(n_users=2_000, n_items=1_000, per_user=15, pool_per_genre=60, seed=0)
SAMPLE_USERS, EVAL_USERS, N = 400, 300, 50

# Sizes only: the scale config's options stay as they are.
SMALL: dict[str, Any] = {
    "two_tower": {
        "dim": 15,
        "id_dim": 15,
        "max_history": 50,
        "train": {"epochs": 3, "batch_size": 1024, "eval_users": 300, "progress": False},
    },
    # ~950 items: under flat_below the plan would search exactly, without the transform.
    "index": {"flat_below": 0, "tuning": {"n_queries": 300}},
    "candidates": {
        "n": N,
        "sample_users": SAMPLE_USERS,
        "eval_users": EVAL_USERS,
        "features": {"cooc_neighbors": 30, "ease_neighbors": 30},
    },
    "teacher": {"deep": [64, 32], "train": {"epochs": 2}},
    "student": {"hidden": [32, 16], "epochs": 3},
    "prune": {"epochs": 2, "ramp_epochs": 1},
    "int8": {"calibration_candidates": 512, "bench_repeats": 5},
    "latency": {"candidates": N, "repeats": 5, "warmup": 1},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            assert key in base, f"scale.toml has no [{key}]"
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Served:
    result: RunResult
    bundle: Bundle
    client: SlimrankClient


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("scale")
    write_world(WORLD, root / "world")
    with open(SCALE, "rb") as f:
        raw = tomllib.load(f)
    config = PipelineConfig.from_dict(
        _merge(
            raw,
            {**SMALL, "cache_dir": str(root / "cache"), "data": {"source": str(root / "world")}},
        )
    )
    result = run_pipeline(config)
    version = publish_run(result, root / "bundles")
    if version is None:
        pytest.fail(f"the small scale pipeline did not pass its gate: {result.gate()}")
    with serving(root / "bundles") as (_, _, client):
        yield Served(result, open_bundle(root / "bundles", version), client)


def test_the_scale_config_trains_what_it_says() -> None:
    with open(SCALE, "rb") as f:
        config = PipelineConfig.from_dict(tomllib.load(f))
    assert config.two_tower.train.loss == "sampled_softmax"
    assert config.candidates.features.ease_method == "local"
    assert config.index.kind == "ivfflat" and config.index.tuning.enabled
    assert config.index.transform == "mips_l2"
    assert config.candidates.sample_users > 0 and config.candidates.eval_users > 0
    assert not config.candidates.refit and config.candidates.hold_out_labels == "sampled"


def test_rankers_train_on_a_sample_of_users(served: Served) -> None:
    train, _, _ = load_view(served.result.path("candidates") / "train.safetensors")
    assert len(np.unique(train.user)) == SAMPLE_USERS
    for view in ("valid", "test"):
        cands, _, _ = load_view(served.result.path("candidates") / f"{view}.safetensors")
        assert len(np.unique(cands.user)) == EVAL_USERS
    # Validation is on the sample too: the teacher's metrics count that many users.
    assert served.result.metrics("teacher")["valid"]["users"] == EVAL_USERS


def test_the_index_is_searched_over_the_mips_transform_with_inner_product_scores(
    served: Served,
) -> None:
    """The bundle names the transform (serving.json format 3), and the retrieval score the
    rankers read is still the inner product of the user's and the item's vectors."""
    spec = json.loads(served.bundle.file("serving.json").read_text())
    index = IndexArtifact.load(served.result.path("index")).index
    assert index.transform == "mips_l2" and index.factory_string.startswith("IVF")
    assert spec["format"] == 3
    assert spec["index"]["transform"] == {"kind": "mips_l2", "max_norm": index.mips_norm}
    emb = EmbeddingsArtifact.load(served.result.path("embeddings"))
    cands, _, _ = load_view(served.result.path("candidates") / "test.safetensors")
    ok = cands.items >= 0
    exact = np.einsum("ud,und->un", emb.user["test"][cands.user], emb.item[cands.items])
    np.testing.assert_allclose(cands.retrieval_score[ok], exact[ok], atol=1e-4 * index.mips_norm**2)


def test_the_server_holds_the_ivf_flat_lists_in_memory(served: Served) -> None:
    """FAISS's memory-mapped IVF-Flat lists cost page faults on every search (10x slower at
    1M); the serving loader reads them into memory and searches as the pipeline's index."""
    index = load_served_index(served.bundle, load_spec(served.bundle))
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)
    offline = IndexArtifact.load(served.result.path("index")).index
    queries = EmbeddingsArtifact.load(served.result.path("embeddings")).user["test"][:20]
    for got, want in zip(index.search(queries, 10), offline.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)


def test_sampled_users_get_the_offline_ranking(served: Served) -> None:
    cands, feats, _ = load_view(served.result.path("candidates") / "test.safetensors")
    bundle = served.bundle
    item_ids, user_ids = read_npy(bundle.file("items.npy")), read_npy(bundle.file("users.npy"))
    scorer = Scorer(bundle.file("ranker.onnx"), bundle.manifest.files["ranker.onnx"].sha256)
    for row in (0, len(cands) // 2, len(cands) - 1):
        scores = scorer.score(feats.values[row])  # (N,)
        top = rank_candidates(cands.items[row : row + 1], scores[None], 10)[0]
        got = served.client.recommend(str(user_ids[int(cands.user[row])]), 10)
        assert got.user_source == "KNOWN"
        assert got.item_ids == tuple(str(item_ids[i]) for i in top if i >= 0)


def test_users_outside_every_sample_are_served_from_the_full_tables(served: Served) -> None:
    """The samples bound training; the served tables still cover every user."""
    path = served.result.path("candidates")
    sampled = set()
    for view in ("train", "valid", "test"):
        sampled |= set(load_view(path / f"{view}.safetensors")[0].user.tolist())
    seen = DataArtifact.load(served.bundle.path / "data").split.seen_for_test()
    outside = [u for u in range(WORLD.n_users) if u not in sampled][:5]
    assert len(outside) == 5
    user_ids = read_npy(served.bundle.file("users.npy"))
    item_ids = read_npy(served.bundle.file("items.npy"))
    for user in outside:
        got = served.client.recommend(str(user_ids[user]), 10)
        assert got.user_source == "KNOWN" and len(got.item_ids) == 10
        assert not set(got.item_ids) & {str(item_ids[i]) for i in seen[user].indices}


def test_the_valid_view_reads_its_own_or_the_history_folds_item_item_tables(
    served: Served,
) -> None:
    """``valid_tables = "own"`` (scale.toml): the valid view's co-occurrence and EASE are
    built from train, as the served ones are from train + valid. ``"fold"``: they are the
    history fold's (the tables the rankers trained on), its history and vectors still train's."""
    result = served.result
    config = result.config.candidates
    assert config.valid_tables == "own"
    data = DataArtifact.load(result.path("data"))
    emb = EmbeddingsArtifact.load(result.path("embeddings"))
    sides = (data.user_features, data.item_features, config.features)
    times = data.seen_times("valid")

    def valid_tables(item_item: FeatureTables | None) -> FeatureTables:
        return build_feature_tables(
            data.seen("valid"), emb.user["valid"], emb.item, *sides, time=times, item_item=item_item
        )

    sampled = np.unique(load_view(result.path("candidates") / "train.safetensors")[0].user)
    fold = build_feature_tables(
        emb.history[0],
        emb.user["fold0"],
        emb.item,
        *sides,
        time=times,
        item_history=fold_item_history(emb.history[0], emb.target[0], sampled),
    )
    cands, feats, _ = load_view(result.path("candidates") / "valid.safetensors")
    own = candidate_features(valid_tables(None), cands).values
    np.testing.assert_allclose(feats.values, own, rtol=1e-6, atol=1e-6)
    shared_config = dataclasses.replace(config, valid_tables="fold")
    index = IndexArtifact.load(result.path("index"))
    mined = candidates_step(shared_config, result.config.k, data, emb, index)
    cands, feats, _ = mined.views["valid"]
    shared = candidate_features(valid_tables(fold), cands).values
    np.testing.assert_allclose(feats.values, shared, rtol=1e-6, atol=1e-6)
    cooc_sum = feats.names.index("cooc_sum")
    assert not np.allclose(own[..., cooc_sum], shared[..., cooc_sum])  # the tables differ


def test_training_lists_read_the_item_statistics_of_all_but_their_labels(served: Served) -> None:
    """The rankers train on the lists of a sample of users; the item statistics of those
    lists (popularity, co-occurrence, EASE) read every user's training items but the sampled
    users' target folds, so they are as complete as the served ones and blind to the labels.
    At 1M, tables from the history fold alone made the rankers lose test NDCG@10."""
    result = served.result
    config = result.config.candidates
    assert config.fold_items == "all" and config.folds == 1
    data = DataArtifact.load(result.path("data"))
    emb = EmbeddingsArtifact.load(result.path("embeddings"))
    cands, feats, labels = load_view(result.path("candidates") / "train.safetensors")
    sampled = np.isin(np.arange(WORLD.n_users), np.unique(cands.user))
    train = data.split.train_matrix().tocsr()
    train.sum_duplicates()
    train.data[:] = 1.0
    history = emb.history[0].tocsr()
    # Written from the definition: the others' whole train rows, the sampled users' history.
    rows = sp.diags((~sampled).astype(np.float32))
    reference = rows @ train + sp.diags(sampled.astype(np.float32)) @ history
    # The labels of the training lists are the sampled users' targets: none is in it.
    labelled = sp.csr_matrix(reference.multiply(emb.target[0]))[sampled]
    labelled.eliminate_zeros()
    assert labelled.nnz == 0 and labels.sum() > 0
    assert reference.nnz > history.nnz  # the other users' target folds are read
    sides = (data.user_features, data.item_features, config.features)
    times = data.seen_times("valid")
    items = build_feature_tables(reference, emb.user["fold0"], emb.item, *sides, time=times)
    tables = build_feature_tables(
        history, emb.user["fold0"], emb.item, *sides, time=times, item_item=items
    )
    expected = candidate_features(tables, cands).values
    names = list(feats.names)
    pop = names.index("item_log_popularity")
    counts = np.asarray(reference.sum(axis=0)).ravel()
    real = cands.mask
    np.testing.assert_allclose(
        feats.values[..., pop][real], np.log1p(counts)[cands.items[real]], rtol=1e-6
    )
    rest = [i for i in range(len(names)) if i != pop]
    np.testing.assert_allclose(feats.values[..., rest], expected[..., rest], rtol=1e-5, atol=1e-5)
    # The history fold's own tables (what the rankers trained on before) give other values.
    own = candidate_features(
        build_feature_tables(history, emb.user["fold0"], emb.item, *sides, time=times), cands
    ).values
    for name in ("item_log_popularity", "cooc_sum", "ease_score"):
        assert not np.allclose(own[..., names.index(name)], feats.values[..., names.index(name)])


def test_the_two_tower_never_trained_on_the_training_lists_labels(served: Served) -> None:
    """Without refit the main two-tower retrieves and featurizes the rankers' training lists,
    so it trains on train minus their labels (the sampled users' target folds): trained again
    on that log, written here from the definition, it gives the saved weights exactly. Trained
    on all of train (before), its retrieval score knew the training lists' labels."""
    result = served.result
    data = DataArtifact.load(result.path("data"))
    emb = EmbeddingsArtifact.load(result.path("embeddings"))
    cands, _, labels = load_view(result.path("candidates") / "train.safetensors")
    log = data.split.train
    target = emb.target[0].tocsr()
    is_label = np.isin(log.user, cands.user) & (np.asarray(target[log.user, log.item]).ravel() > 0)
    # Every positive of the training lists is one of those rows.
    rows, cols = np.nonzero(labels > 0)
    label_pairs = set(zip(cands.user[rows].tolist(), cands.items[rows, cols].tolist(), strict=True))
    held = set(zip(log.user[is_label].tolist(), log.item[is_label].tolist(), strict=True))
    assert label_pairs and label_pairs <= held
    saved = TwoTowerArtifact.load(result.path("two_tower"))
    assert saved.metrics["held_out_labels"] == int(is_label.sum()) > 0
    split = dataclasses.replace(data.split, train=log.take(~is_label))
    again = train_two_tower(
        saved.model.config,
        result.config.two_tower.train,
        split,
        data.user_features,
        data.item_features,
    ).model
    want = saved.model.state_dict()
    got = again.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_the_teacher_learns_a_correction_to_the_retrieval_score(served: Served) -> None:
    """scale.toml's teacher starts from the retrieval score's ranking (``base_feature``):
    its untrained model ranks as retrieval alone does, so the epoch early stopping keeps on
    valid is no worse than retrieval alone there."""
    result = served.result
    teacher = TeacherArtifact.load(result.path("teacher"))
    assert teacher.model.config.base_feature == list(teacher.feature_names).index("retrieval_score")
    valid = result.metrics("teacher")["valid"]["ndcg@10"]
    assert valid >= result.metrics("candidates")["valid"]["ndcg@10"]
    # The untrained model of that shape: retrieval's order, list by list.
    cands, feats, _ = load_view(result.path("candidates") / "valid.safetensors")
    data = DataArtifact.load(result.path("data"))
    _, train_feats, _ = load_view(result.path("candidates") / "train.safetensors")
    config = teacher_model_config(
        result.config.teacher, feats.values.shape[-1], data, tuple(feats.names)
    )
    untrained = DCNv2(config)
    untrained.fit_normalization(train_feats.values, train_feats.mask)
    untrained.eval()
    scores = teacher_scores(untrained, feats)
    real = cands.mask
    for row in range(0, len(cands), 37):
        keep = real[row]
        np.testing.assert_array_equal(
            np.argsort(-scores[row][keep], kind="stable"),
            np.argsort(-cands.retrieval_score[row][keep], kind="stable"),
        )


def test_an_unknown_base_feature_is_named(served: Served) -> None:
    teacher = dataclasses.replace(served.result.config.teacher, base_feature="retrieval_scor")
    data = DataArtifact.load(served.result.path("data"))
    with pytest.raises(ConfigError) as err:
        teacher_model_config(teacher, 2, data, ("retrieval_score", "ease_score"))
    assert err.value.key == "teacher.base_feature"
    assert "'retrieval_scor' is not a candidate feature" in str(err.value)


def test_the_scale_bench_compares_the_served_ranker_with_the_peers(served: Served) -> None:
    """bench/scale_steps.py's last step, on this run: it broke at 1M when report.VARIANTS
    gained a fourth field (its sub-directory)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "scale_steps.py"
    spec = importlib.util.spec_from_file_location("scale_steps", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    comparison = bench.peer_comparison(served.result).to_dict()
    names = [row["name"] for row in comparison["rows"]]
    assert names[0] == "pipeline, pruned int8 student (served)"
    assert "ALS (implicit)" in names and "most popular" in names
    # The retrieval row names the index the config built, not a fixed "IVF-PQ".
    factory = IndexArtifact.load(served.result.path("index")).index.factory_string
    assert factory.startswith("IVF") and factory.endswith(",Flat")
    retrieval = (
        f"two-tower retrieval alone ({factory} over the MIPS-to-L2 transform, {N} candidates)"
    )
    assert retrieval in names
    int8 = served.result.metrics("int8")["valid"]["ndcg@10"]
    assert comparison["rows"][0]["valid_ndcg"] == int8
