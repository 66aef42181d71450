"""ModelSnapshot and SnapshotHolder against brute-force numpy references on seeded data."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from slimrank.retrieval.two_tower import TwoTower, TwoTowerConfig
from slimrank.serving.history_encoder import HistoryEncoder
from slimrank.serving.snapshot import (
    ModelSnapshot,
    SnapshotHolder,
    UserSource,
    build_flat_snapshot,
    random_snapshot,
    top_k,
    warm_up,
)


@pytest.fixture(scope="module")
def snap() -> ModelSnapshot:
    return random_snapshot("v1", n_items=300, n_users=40, dim=8, seed=3)


def test_user_query_sources(snap: ModelSnapshot) -> None:
    known = snap.user_query("u7", ["i1"])
    assert known.source is UserSource.KNOWN and known.row == 7
    np.testing.assert_array_equal(known.vector, snap.user_vectors[7])

    recent = snap.user_query("nobody", ["i3", "unknown-item", "i5"])
    assert recent.source is UserSource.RECENT and recent.row == -1
    np.testing.assert_allclose(recent.vector, (snap.item_vectors[3] + snap.item_vectors[5]) / 2)

    for user, items in (("", []), ("nobody", ["unknown-item"])):
        cold = snap.user_query(user, items)
        assert cold.source is UserSource.POPULAR and cold.vector is None


def test_recent_items_reach_the_history_encoder_oldest_first_each_once(snap: ModelSnapshot) -> None:
    torch.manual_seed(0)
    config = TwoTowerConfig(
        n_items=snap.n_items, dim=8, id_dim=8, projection=False, max_history=2, init_std=0.1
    )
    encoder = HistoryEncoder(TwoTower(config))
    served = dataclasses.replace(snap, encode_history=encoder)
    query = served.user_query("nobody", ["i5", "i3", "unknown-item", "i5", "i9"])
    assert query.source is UserSource.RECENT and query.history.tolist() == [3, 5, 9]
    # Each item once, where named last: i3, i5, i9; the tower keeps the last two.
    np.testing.assert_array_equal(query.vector, encoder(np.array([5, 9])))
    assert np.abs(query.vector - encoder(np.array([3, 9]))).max() > 1e-3
    warm_up(served)


def test_candidates_match_exact_search_minus_dropped(snap: ModelSnapshot) -> None:
    vector = snap.user_vectors[0]
    drop = np.argsort(-(snap.item_vectors @ vector))[[0, 2, 5]]  # three of the best items
    got = snap.candidates(vector, 50, drop)
    order = np.argsort(-(snap.item_vectors @ vector), kind="stable")
    expected = order[~np.isin(order, drop)][:50]
    np.testing.assert_array_equal(got, expected)


def test_candidates_capped_by_catalog(snap: ModelSnapshot) -> None:
    got = snap.candidates(snap.user_vectors[1], 10_000, np.array([0, 1], dtype=np.int64))
    assert got.size == snap.n_items - 2 and len(set(got.tolist())) == got.size


def test_popular_candidates_and_rank(snap: ModelSnapshot) -> None:
    drop = snap.popular_order[:2]
    got = snap.popular_candidates(5, drop)
    np.testing.assert_array_equal(got, snap.popular_order[2:7])
    cold = snap.user_query("", [])
    np.testing.assert_array_equal(snap.rank(cold, got), snap.popularity[got])


def test_rank_is_dot_plus_log_popularity(snap: ModelSnapshot) -> None:
    query = snap.user_query("u2", [])
    cands = np.arange(0, 300, 7)
    expected = snap.item_vectors[cands] @ snap.user_vectors[2] + 0.1 * np.log1p(
        snap.popularity[cands]
    )
    np.testing.assert_allclose(snap.rank(query, cands), expected, rtol=1e-5)


def test_top_k_orders_by_score_ties_by_position() -> None:
    rows, scores = top_k(np.array([10, 11, 12, 13]), np.array([0.5, 0.9, 0.5, 0.1]), 3)
    assert rows.tolist() == [11, 10, 12] and scores.tolist() == [0.9, 0.5, 0.5]


def test_snapshot_rejects_inconsistent_shapes() -> None:
    items = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="popularity"):
        build_flat_snapshot("v", ["a", "b", "c", "d"], items, [], np.ones((0, 3)), np.ones(3))
    with pytest.raises(ValueError, match="not unique"):
        build_flat_snapshot("v", ["a", "a", "c", "d"], items, [], np.ones((0, 3)), np.ones(4))
    with pytest.raises(ValueError, match="user_vectors"):
        build_flat_snapshot("v", ["a", "b", "c", "d"], items, ["u"], np.ones((1, 2)), np.ones(4))


def test_warm_up_rejects_a_ranker_that_returns_nan(snap: ModelSnapshot) -> None:
    warm_up(snap)
    broken = dataclasses.replace(snap, score=lambda f: np.full(len(f), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="not finite"):
        warm_up(broken)


def test_holder_swap_keeps_taken_snapshot_and_notifies(snap: ModelSnapshot) -> None:
    other = random_snapshot("v2", n_items=50, n_users=5, dim=8, seed=4)
    seen: list[str] = []
    holder = SnapshotHolder(snap)
    holder.subscribe(lambda s: seen.append(s.version))
    taken = holder.get()
    assert holder.swap(other) is snap
    assert taken.version == "v1" and holder.get() is other
    assert holder.served().snapshot is other
    assert seen == ["v1", "v2"]


def test_holder_swaps_from_many_threads_end_consistent(snap: ModelSnapshot) -> None:
    versions = [random_snapshot(f"v{i}", n_items=20, n_users=2, dim=8, seed=i) for i in range(8)]
    holder = SnapshotHolder(snap)
    seen: list[str] = []
    holder.subscribe(lambda s: seen.append(s.version))
    threads = [threading.Thread(target=holder.swap, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Listeners run under the swap lock, so the last one notified is the one served.
    assert seen[-1] == holder.get().version and sorted(seen[1:]) == sorted(
        v.version for v in versions
    )
