"""Users the bundle does not know but who send recent items, served by the real server.

The trusted reference is a known user: served anonymously with their whole seen history as
recent items, they must get their stored vector, their features and their top 10. That holds
exactly only when neither the two-tower nor the ranker reads user features (a new user has
none), so this module publishes tiny.toml's pipeline over the same synthetic catalog given as
a plain interaction log, without its feature tables. The request featurizer is also checked
against a by-hand reference: the bundle's tables with the user appended as one more row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from served_store import serving

from slimrank.bundle import Bundle, open_bundle, publish
from slimrank.data.dataset import FeatureTable
from slimrank.pipeline.config import load_config
from slimrank.pipeline.publish import publish_run, read_serving
from slimrank.pipeline.run import run_pipeline
from slimrank.pipeline.synthetic import synthetic_dataset
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import FeatureConfig, build_feature_tables, candidate_features
from slimrank.ranking.histories import Histories
from slimrank.serving.client import SlimrankClient
from slimrank.serving.featurizer import RequestFeaturizer
from slimrank.serving.loader import load_snapshot
from slimrank.serving.reload import load_current
from slimrank.serving.snapshot import (
    ModelSnapshot,
    Retrieved,
    UserQuery,
    UserSource,
    warm_up,
)

TINY = Path(__file__).resolve().parent.parent / "slimrank" / "configs" / "tiny.toml"
K = 10


@dataclasses.dataclass(frozen=True)
class Plain:
    bundles: Path
    bundle: Bundle
    snapshot: ModelSnapshot  # the one the server serves
    client: SlimrankClient

    def seen(self, user: int) -> np.ndarray:
        """Return the ``(s,)`` item rows a known user has (train + valid)."""
        return self.snapshot.seen_rows(user)

    def ids(self, rows: np.ndarray) -> list[str]:
        return [str(self.snapshot.item_ids[r]) for r in rows]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plain]:
    root = tmp_path_factory.mktemp("plain-pipeline")
    config = load_config(TINY)
    data = config.data
    catalog = synthetic_dataset(
        data.synthetic_users, data.synthetic_items, data.synthetic_per_user, data.synthetic_seed
    )
    inter = catalog.interactions
    logs = root / "logs.csv"  # a log with no feature files: no user (or item) features
    frame = {
        "user_id": catalog.users.ids[inter.user],
        "item_id": catalog.items.ids[inter.item],
        "timestamp": inter.timestamp,
    }
    pd.DataFrame(frame).to_csv(logs, index=False)
    config = dataclasses.replace(
        config, data=dataclasses.replace(data, source=str(logs)), cache_dir=str(root / "cache")
    )
    version = publish_run(run_pipeline(config), root / "bundles")
    if version is None:
        pytest.fail("the plain tiny pipeline did not publish")
    with serving(root / "bundles") as (holder, _, client):
        yield Plain(root / "bundles", open_bundle(root / "bundles", version), holder.get(), client)


def test_the_plain_bundle_reads_no_user_features_and_carries_its_user_tower(plain: Plain) -> None:
    serving = read_serving(plain.bundle.path)
    assert serving.features_layout["user_side_names"] == []
    assert serving.user_tower == "two_tower"
    assert plain.snapshot.encode_history is not None


def test_a_known_user_sent_as_recent_items_gets_their_vector_features_and_top_k(
    plain: Plain,
) -> None:
    snap = plain.snapshot
    names = list(read_serving(plain.bundle.path).features_layout["feature_names"])
    for user in range(len(snap.user_ids)):
        seen = plain.seen(user)  # newest first
        recent = plain.ids(seen[::-1])  # sent oldest first, as a frontend would
        known = snap.user_query(str(snap.user_ids[user]), [])
        anon = snap.user_query("", recent)
        assert anon.source is UserSource.RECENT and anon.row == -1
        np.testing.assert_array_equal(anon.history.items, seen)
        np.testing.assert_allclose(anon.vector, snap.user_vectors[user], rtol=1e-5, atol=1e-6)

        cands = snap.retrieve(known, snap.n_candidates, seen)
        want = snap.featurize(known, cands)  # (m, F)
        assert np.abs(want[:, names.index("cooc_sum")]).max() > 0  # history signals are there
        np.testing.assert_allclose(snap.featurize(anon, cands), want, rtol=1e-5, atol=1e-6)

        by_id = plain.client.recommend(str(snap.user_ids[user]), K)
        by_items = plain.client.recommend("", K, recent=recent)
        assert (by_id.user_source, by_items.user_source) == ("KNOWN", "RECENT")
        assert by_items.item_ids == by_id.item_ids
        np.testing.assert_allclose(by_items.scores, by_id.scores, rtol=1e-5, atol=1e-5)
        assert by_items.candidates == by_id.candidates


def test_recent_items_are_never_recommended_back(plain: Plain) -> None:
    recent = plain.ids(plain.seen(3)[:4])
    first = plain.client.recommend("someone-new", K, recent=recent)
    assert first.user_source == "RECENT" and len(first.item_ids) == K
    assert not set(first.item_ids) & set(recent)
    # The best three answers, sent back as recent items, are gone from the next answer.
    more = recent + list(first.item_ids[:3])
    second = plain.client.recommend("someone-new", 100, recent=more)
    assert second.item_ids and not set(second.item_ids) & set(more)


def test_unknown_recent_ids_are_ignored_and_none_known_falls_back_to_popularity(
    plain: Plain,
) -> None:
    recent = plain.ids(plain.seen(5)[:6])
    clean = plain.client.recommend("", K, recent=recent)
    noisy = plain.client.recommend("someone-new", K, recent=["nope", *recent, "gone", "nope"])
    assert noisy.user_source == clean.user_source == "RECENT"
    assert noisy.item_ids == clean.item_ids
    np.testing.assert_array_equal(noisy.scores, clean.scores)

    none_known = plain.client.recommend("someone-new", K, recent=["nope", "gone"])
    popular = plain.client.recommend("", K)
    assert none_known.user_source == popular.user_source == "POPULAR"
    assert none_known.item_ids == popular.item_ids
    top = plain.snapshot.popular_order[:K]
    assert none_known.item_ids == tuple(plain.ids(top))


def test_a_bundle_without_the_two_tower_pools_the_mean_of_the_item_vectors(
    plain: Plain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = plain.bundle.manifest
    files = {n: p for n, p in plain.bundle.files.items() if not n.startswith("two_tower/")}
    assert len(files) < len(manifest.files)
    old = publish(
        tmp_path, files, config=manifest.config, metrics=manifest.metrics, gate=manifest.gate
    )
    with caplog.at_level(logging.INFO, logger="slimrank.serving.pipeline_loader"):
        snap = load_current(tmp_path)
        load_snapshot(plain.bundle)
    assert f"bundle {old}: users known only by recent items get the mean of" in caplog.text
    assert f"bundle {plain.bundle.version}: users known only by recent items get the two" in (
        caplog.text
    )
    assert snap.encode_history is None
    warm_up(snap)
    rows = plain.seen(7)[:5]
    query = snap.user_query("", plain.ids(rows))
    np.testing.assert_allclose(query.vector, snap.item_vectors[rows].mean(axis=0), atol=1e-7)
    # The features still take the recent items as history: that needs no tower.
    cands = snap.retrieve(query, snap.n_candidates, rows)
    want = plain.snapshot.featurize(query, cands)
    np.testing.assert_array_equal(snap.featurize(query, cands), want)


# -- the request featurizer against the tables with the user appended ---------------------------

N_USERS, N_ITEMS = 40, 50


def _tables(config: FeatureConfig):
    rng = np.random.default_rng(0)
    history = sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < 0.2).astype(np.float32))
    users = FeatureTable(N_USERS, numeric={"age": rng.uniform(18, 70, N_USERS)})
    items = FeatureTable(
        N_ITEMS, categorical={"genre": rng.integers(0, 3, N_ITEMS)}, cardinality={"genre": 3}
    )
    user_vecs = rng.standard_normal((N_USERS, 6)).astype(np.float32)
    item_vecs = rng.standard_normal((N_ITEMS, 6)).astype(np.float32)
    return build_feature_tables(history, user_vecs, item_vecs, users, items, config)


def _appended(tables, newest_first: np.ndarray, vector: np.ndarray):
    """Return the tables with one more user: that history, that vector, no side features."""
    hist = tables.history
    return dataclasses.replace(
        tables,
        history=Histories(
            np.append(hist.indptr, hist.indptr[-1] + len(newest_first)),
            np.concatenate([hist.items, newest_first]),
            N_ITEMS,
        ),
        user_vecs=np.vstack([tables.user_vecs, vector[None]]),
        user_side=np.vstack([tables.user_side, np.zeros((1, tables.user_side.shape[1]))]),
    )


CONFIGS = {
    "history cap binds": FeatureConfig(history_cap=3, cooc_neighbors=10, ease_lambda=10.0),
    "whole history": FeatureConfig(history_cap=100, ease_lambda=10.0),
    "no EASE": FeatureConfig(ease_lambda=0.0),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_request_features_are_those_of_one_more_user_with_that_history(
    config: FeatureConfig,
) -> None:
    tables = _tables(config)
    featurize = RequestFeaturizer(tables)
    rng = np.random.default_rng(1)
    for n in (0, 1, 4, 12):
        sent = rng.choice(N_ITEMS, n, replace=False)  # oldest first, as a request sends them
        vector = rng.standard_normal(6).astype(np.float32)
        items = rng.permutation(N_ITEMS)[:20]
        ref = _appended(tables, sent[::-1], vector)
        assert ref.feature_names == tables.feature_names
        scores = rng.standard_normal(20).astype(np.float32)  # (m,) the index's scores
        cands = Candidates(np.array([N_USERS]), items[None], scores[None])
        want = candidate_features(ref, cands).values[0]  # (m, F)
        query = UserQuery(UserSource.RECENT, -1, vector, Histories.from_items(sent, N_ITEMS))
        got = featurize(query, Retrieved(items, scores))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        if n == 0:  # a vector with no history at all (a Search query) is the same
            bare = UserQuery(UserSource.RECENT, -1, vector)
            np.testing.assert_array_equal(featurize(bare, Retrieved(items, scores)), got)


def test_request_features_need_a_known_row_or_a_vector() -> None:
    """A query with neither (the popular fallback) is never featurized: it fails loudly."""
    featurize = RequestFeaturizer(_tables(FeatureConfig()))
    items = np.arange(5)
    with pytest.raises(ValueError, match="without a vector"):
        featurize(UserQuery(UserSource.POPULAR, -1, None), Retrieved(items, np.ones(5, "f4")))
