"""Candidate features: shapes, determinism, U=1 equals the batch, signals against dense
references (EASE's dense scores, hand-computed co-occurrences, dense item-item tables)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from slimrank.data.dataset import FeatureTable
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.ranking.candidates import Candidates, exact_search, mine_candidates
from slimrank.ranking.feature_io import load_tables, save_tables
from slimrank.ranking.features import (
    FeatureConfig,
    FeatureTables,
    build_feature_tables,
    candidate_features,
    known_users,
    new_user,
    side_matrix,
)
from slimrank.ranking.histories import Histories, latest_times
from slimrank.ranking.neighbors import (
    JointNeighbors,
    NeighborTable,
    _item_blocks,
    cooccurrence_table,
    descending_bits,
    ease_exact_table,
    ease_local_table,
    history_signals,
    top_k_rows,
)

WIDE = FeatureConfig(history_cap=1000, cooc_neighbors=1000, ease_neighbors=1000)


def random_history(seed: int, n_users: int, n_items: int, density: float) -> sp.csr_matrix:
    history = sp.random(n_users, n_items, density=density, random_state=seed, format="csr")
    history.data[:] = 1.0
    return history


def small_world(seed: int = 0, n_users: int = 25, n_items: int = 40, d: int = 4, config=WIDE):
    rng = np.random.default_rng(seed)
    history = random_history(seed, n_users, n_items, 0.15)
    user_vecs = rng.normal(size=(n_users, d)).astype(np.float32)
    item_vecs = rng.normal(size=(n_items, d)).astype(np.float32)
    users_ft = FeatureTable(
        n_users,
        categorical={"gender": rng.integers(0, 3, n_users), "zip": rng.integers(0, 500, n_users)},
        cardinality={"gender": 3, "zip": 500},
    )
    items_ft = FeatureTable(
        n_items,
        numeric={"year": rng.normal(1990, 5, n_items).astype(np.float32)},
        multi_hot={"genre": (rng.random((n_items, 3)) < 0.3).astype(np.float32)},
    )
    tables = build_feature_tables(history, user_vecs, item_vecs, users_ft, items_ft, config)
    cands = mine_candidates(user_vecs, exact_search(item_vecs), np.arange(n_users), 12, history)
    return tables, cands, history


def test_shape_names_and_determinism() -> None:
    tables, cands, _ = small_world()
    a = candidate_features(tables, cands)
    b = candidate_features(tables, cands)
    d = 4
    # 9 signals, gender one-hot (zip has too many values), year, 3 genres, 3 * d, 2 ranks
    assert a.values.shape == (25, 12, 9 + 3 + 1 + 3 + 3 * d + 2)
    assert a.values.dtype == np.float32
    assert len(a.names) == a.values.shape[2] == len(set(a.names))
    assert a.names == tables.feature_names == tables.layout.names
    assert "user_gender=1" in a.names and not any("zip" in n for n in a.names)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.items, cands.items)


def test_one_user_equals_its_batch_row() -> None:
    tables, cands, _ = small_world(seed=1, config=FeatureConfig(history_cap=3))
    batch = candidate_features(tables, cands)
    for row in (0, 7, 24):
        one = candidate_features(tables, cands.take(np.array([row])))
        np.testing.assert_array_equal(one.values[0], batch.values[row])


def test_a_new_user_with_a_known_users_history_gets_that_users_features() -> None:
    tables, cands, _ = small_world(seed=7, config=FeatureConfig(history_cap=4))
    row = 5
    hist = Histories(
        np.array([0, tables.history.lengths[row]]), tables.history.row(row), tables.n_items
    )
    one = cands.take(np.array([row]))
    want = candidate_features(tables, one).values[0]
    batch = new_user(tables, hist, tables.user_vecs[row])
    got = candidate_features(tables, one, batch).values[0]
    side = [i for i, n in enumerate(tables.feature_names) if n.startswith("user_gender")]
    assert want[:, side].any()  # the known user has side features, the new one has none
    assert not got[:, side].any()
    rest = np.setdiff1d(np.arange(want.shape[1]), side)
    np.testing.assert_array_equal(got[:, rest], want[:, rest])


def test_columns_match_their_definition() -> None:
    tables, cands, history = small_world(seed=2)
    feats = candidate_features(tables, cands)
    col = tables.layout.column
    v = feats.values
    np.testing.assert_allclose(v[:, :, col["retrieval_score"]], cands.retrieval_score)
    pop = np.asarray(history.sum(axis=0)).ravel()
    np.testing.assert_allclose(v[:, :, col["item_log_popularity"]], np.log1p(pop[cands.items]))
    lengths = np.diff(history.indptr)[cands.user]
    np.testing.assert_allclose(v[:, 0, col["user_log_history"]], np.log1p(lengths))
    u, i = tables.user_vecs[cands.user], tables.item_vecs[cands.items]
    np.testing.assert_allclose(v[:, :, col["dot_2"]], u[:, None, 2] * i[:, :, 2], rtol=1e-6)
    # With every neighbour kept, the EASE score feature equals the dense EASE scores X @ B.
    b = ease_weights(history, EaseConfig(l2=WIDE.ease_lambda))
    dense = np.asarray(history.toarray() @ b)
    np.testing.assert_allclose(
        v[:, :, col["ease_score"]], dense[cands.user[:, None], cands.items], atol=1e-5
    )


def test_cooccurrence_by_hand_on_four_items() -> None:
    # u0: {0, 1}; u1: {0, 1, 2}; u2: {1, 3}. Item counts 2, 3, 1, 1.
    history = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float32))
    c = cooccurrence_table(history, k=10).to_csr().toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 2 / np.sqrt(6)
    expected[0, 2] = expected[2, 0] = 1 / np.sqrt(2)
    expected[1, 2] = expected[2, 1] = 1 / np.sqrt(3)
    expected[1, 3] = expected[3, 1] = 1 / np.sqrt(3)
    np.testing.assert_allclose(c, expected, rtol=1e-6)
    vecs = np.eye(4, 2, dtype=np.float32)
    config = FeatureConfig(ease_lambda=0)
    tables = build_feature_tables(history, vecs[:3], vecs, config=config)
    cands = Candidates(np.array([0]), np.array([[2, 3, -1]]), np.array([[0.5, 0.2, 0.0]]))
    feats = candidate_features(tables, cands)
    col = tables.layout.column
    assert "ease_score" not in col
    got = feats.values[0]
    np.testing.assert_allclose(got[:2, col["cooc_sum"]], [2**-0.5 + 3**-0.5, 3**-0.5], rtol=1e-6)
    np.testing.assert_allclose(got[:2, col["cooc_max"]], [2**-0.5, 3**-0.5], rtol=1e-6)
    np.testing.assert_allclose(
        got[:2, col["cooc_mean"]], [(2**-0.5 + 3**-0.5) / 2, 3**-0.5 / 2], rtol=1e-6
    )
    np.testing.assert_array_equal(got[2], 0.0)  # the pad


def test_cooccurrence_blocks_do_not_change_the_table() -> None:
    history = random_history(3, 60, 50, 0.2)
    whole = cooccurrence_table(history, k=7, block_pairs=10**9).to_csr()
    blocked = cooccurrence_table(history, k=7, block_pairs=50).to_csr()
    assert (whole != blocked).nnz == 0
    assert np.diff(whole.indptr).max() == 7  # (the matrix T[c, h])


def test_truncation_keeps_the_strongest_by_value_or_magnitude() -> None:
    m = sp.random(30, 30, density=0.5, random_state=3, format="csr", dtype=np.float32)
    m.data -= 0.5  # signed weights
    full = m.toarray()
    for by_magnitude in (False, True):
        top = NeighborTable.from_csr(m, 3, by_magnitude=by_magnitude)
        dense = top.to_csr().toarray()
        assert (top.lengths <= 3).all() and top.indices.shape[1] <= 3
        for r in range(30):
            kept = np.flatnonzero(dense[r])
            np.testing.assert_array_equal(dense[r, kept], full[r, kept])
            key = np.abs(full[r]) if by_magnitude else full[r]
            stored = full[r] != 0
            if stored.sum() > 3:
                assert key[kept].min() >= key[stored & (dense[r] == 0)].max()
            # strongest first within a row
            vals = top.values[r, : top.lengths[r]]
            k = np.abs(vals) if by_magnitude else vals
            assert (np.diff(k) <= 0).all()


def test_descending_bits_sort_floats_from_highest_to_lowest() -> None:
    f32 = np.finfo(np.float32)
    values = np.array(
        [
            -np.inf,
            -f32.max,
            -1.5,
            -1.0,
            -f32.tiny,
            -1e-45,
            1e-45,
            f32.tiny,
            0.25,
            1.0,
            f32.max,
            np.inf,
        ],
        dtype=np.float32,
    )
    shuffled = np.random.default_rng(0).permutation(values)
    np.testing.assert_array_equal(shuffled[np.argsort(descending_bits(shuffled))], values[::-1])


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_top_k_rows_equal_a_sort_by_row_strength_and_column(by_magnitude: bool) -> None:
    """Values on a coarse grid tie often (and +-v tie by magnitude); duplicates are summed
    and explicit zeros dropped before ranking. Reference: lexsort of the whole matrix."""
    rng = np.random.default_rng(7)
    n = 4000
    rows, cols = rng.integers(0, 60, n), rng.integers(0, 90, n)
    data = rng.integers(-4, 5, n).astype(np.float32) / 4  # ties, signs and zeros
    m = sp.csr_matrix((data, (rows, cols)), shape=(60, 90))  # duplicates summed here
    m.data[::17] = 0.0  # explicit zeros
    ref = m.copy()
    ref.eliminate_zeros()
    ref.sort_indices()
    r = np.repeat(np.arange(60), np.diff(ref.indptr))
    key = np.abs(ref.data) if by_magnitude else ref.data
    order = np.lexsort((ref.indices, -key, r))
    for k in (1, 5, 0):
        indices, values = top_k_rows(m, k, by_magnitude=by_magnitude)
        for row in range(60):
            mine = order[r[order] == row][: k or None]
            width = len(mine)
            np.testing.assert_array_equal(indices[row, :width], ref.indices[mine])
            np.testing.assert_array_equal(values[row, :width], ref.data[mine])
            assert (indices[row, width:] == 90).all() and (values[row, width:] == 0).all()


def dense_signals(weights: np.ndarray, hist: Histories, cap: int, items: np.ndarray):
    """The reference: sum and max of ``weights[h, c]`` over the cap newest items of each row."""
    total = np.zeros(items.shape, dtype=np.float64)
    best = np.zeros(items.shape, dtype=np.float64)
    for u in range(hist.n_rows):
        h = hist.row(u)[:cap]
        for n, c in enumerate(items[u]):
            if c < 0 or not len(h):
                continue
            total[u, n] = weights[h, c].sum()
            best[u, n] = weights[h, c].max()
    return total, best


@pytest.mark.parametrize("sign", ["signed", "nonnegative", "negative"])
def test_history_signals_equal_the_dense_reference(sign: str) -> None:
    rng = np.random.default_rng(4)
    n_users, n_items = 30, 40
    m = sp.random(n_items, n_items, density=0.3, random_state=4, format="csr", dtype=np.float32)
    # signed: the max of absent (0) and negative weights is exercised; nonnegative: the
    # table's shortcut (no max over hits alone); negative: every hit is below the 0 of absence.
    m.data = {"signed": m.data - 0.3, "nonnegative": m.data + 0.01, "negative": -m.data - 0.01}[
        sign
    ]
    table = NeighborTable.from_csr(m, 8, by_magnitude=True)  # row c: c's in-neighbours
    assert table.nonnegative == (sign == "nonnegative")
    weights = table.to_csr().toarray().T  # weights[h, c]
    observed = random_history(5, n_users, n_items, 0.2)
    times = observed.copy()
    times.data = rng.integers(1, 10**6, size=observed.nnz).astype(np.float64)
    hist = Histories.from_matrix(observed, times)
    items = np.stack([rng.permutation(n_items)[:9] for _ in range(n_users)])  # distinct per row
    items[rng.random(items.shape) < 0.2] = -1  # pads
    for cap in (1, 3, 100):
        capped = hist.recent(np.arange(n_users), cap)
        want = dense_signals(weights, hist, cap, items)
        got = history_signals(capped, table, items)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-6)
        # One row at a time gives the same rows (the marks are cleared between rows).
        for u in (0, 11, 29):
            one = history_signals(capped.recent(np.array([u]), 0), table, items[u : u + 1])
            np.testing.assert_array_equal(one[0][0], got[0][u])
            np.testing.assert_array_equal(one[1][0], got[1][u])


def test_joint_tables_give_each_tables_dense_signals() -> None:
    # Tables of different widths and signs side by side: each keeps its own sums and maxima
    # (a column bound off by one, or one table's hits counted for another, changes them).
    rng = np.random.default_rng(8)
    n_users, n_items = 25, 30
    tables = []
    for seed, k, shift in ((1, 3, 0.01), (2, 7, -0.4), (3, 12, -1.5)):
        m = sp.random(n_items, n_items, density=0.4, random_state=seed, format="csr")
        m.data = (m.data + shift).astype(np.float32)
        tables.append(NeighborTable.from_csr(m, k, by_magnitude=True))
    assert len({t.indices.shape[1] for t in tables}) == 3
    joint = JointNeighbors.of(tables)
    observed = random_history(9, n_users, n_items, 0.25)
    hist = Histories.from_matrix(observed)
    items = np.stack([rng.permutation(n_items)[:10] for _ in range(n_users)])
    items[rng.random(items.shape) < 0.15] = -1
    for cap in (2, 100):
        capped = hist.recent(np.arange(n_users), cap)
        got = joint.signals(capped, items)
        assert len(got) == 3
        for i, (table, (total, best)) in enumerate(zip(tables, got, strict=True)):
            want = dense_signals(table.to_csr().toarray().T, hist, cap, items)
            np.testing.assert_allclose(total, want[0], atol=1e-5)
            np.testing.assert_allclose(best, want[1], atol=1e-6)
            np.testing.assert_array_equal(joint.table(i).indices, table.indices)
            np.testing.assert_array_equal(joint.table(i).values, table.values)


def masked_sums_and_maxima(table: NeighborTable, hist: Histories, items: np.ndarray):
    """The reference for one table, bit for bit: each real candidate's row of weights, zero
    off the history, summed and maximized (from 0) along the row; where every history item
    holds a weight for the candidate, the max of those weights alone. 0 at pads and empty
    rows."""
    total = np.zeros(items.shape, dtype=np.float32)
    best = np.zeros(items.shape, dtype=np.float32)
    for u in range(hist.n_rows):
        h = hist.row(u)
        if not len(h):
            continue
        real = items[u] >= 0
        rows = np.where(real, items[u], 0)
        hit = np.isin(table.indices[rows], h) & real[:, None]
        weight = table.values[rows] * hit
        total[u], best[u] = weight.sum(axis=1), weight.max(axis=1, initial=0.0)
        full = hit.sum(axis=1) == len(h)
        if full.any():
            best[u, full] = np.where(hit[full], weight[full], -np.inf).max(axis=1)
    return total, best


@pytest.mark.parametrize("width", [6, 40, 130])
def test_joint_tables_of_one_width_reduce_each_table_bit_for_bit(width: int) -> None:
    # Nonnegative tables of one width (the served case: the max is the masked row's) are
    # reduced as one (N, T, K) block: each table must keep its own columns, to the bit.
    # Widths below 8, up to 128 and past it take numpy's three ways of summing a row.
    # A signed table beside them: its maxima may be negative (and -0.0 is not 0.0 to the bit).
    rng = np.random.default_rng(12)
    n_users, n_items = 20, 160
    tables = []
    for seed, shift in ((4, 0.0), (5, 0.0), (6, -0.5)):
        m = sp.random(n_items, n_items, density=0.9, random_state=seed, format="csr")
        m.data = ((m.data + shift) * 10.0 ** rng.uniform(-3, 3, m.nnz)).astype(np.float32)
        tables.append(NeighborTable.from_csr(m, width, by_magnitude=True))
    assert [t.nonnegative for t in tables] == [True, True, False]
    assert {t.indices.shape[1] for t in tables} == {width}
    joint = JointNeighbors.of(tables)
    # Short histories too: a candidate whose every history item is an in-neighbour.
    hist = Histories.from_matrix(random_history(13, n_users, n_items, 0.5))
    hist = hist.recent(np.arange(n_users), 0 if width > 6 else 2)
    items = np.stack([rng.permutation(n_items)[:12] for _ in range(n_users)])
    items[rng.random(items.shape) < 0.2] = -1
    got = joint.signals(hist, items)
    for table, (total, best) in zip(tables, got, strict=True):
        want = masked_sums_and_maxima(table, hist, items)
        np.testing.assert_array_equal(total, want[0])
        np.testing.assert_array_equal(best, want[1])
        assert (total != 0).any()  # the histories reach the tables: not a test of zeros


def test_joint_tables_of_width_zero_give_zeros() -> None:
    n_items = 5
    joint = JointNeighbors(
        np.zeros((n_items, 0), np.int32),
        np.zeros((n_items, 0), np.float32),
        ((0, 0), (0, 0)),
        (True, False),
    )
    hist = Histories(np.array([0, 2]), np.array([1, 3]), n_items)
    for total, best in joint.signals(hist, np.array([[0, 1, -1]])):
        np.testing.assert_array_equal(total.view(np.uint32), np.zeros((1, 3), np.uint32))
        np.testing.assert_array_equal(best.view(np.uint32), np.zeros((1, 3), np.uint32))


def test_max_over_negative_weights_when_the_history_fills_the_row() -> None:
    # Item 2's in-neighbours: 0 (W[0, 2] = -0.5) and 1 (W[1, 2] = -0.2); width 2.
    table = NeighborTable(
        np.array([[3, 3], [3, 3], [0, 1]]), np.array([[0, 0], [0, 0], [-0.5, -0.2]])
    )
    items = np.array([[2, -1]])
    both = Histories(np.array([0, 2]), np.array([1, 0]), 3)  # as long as the row is wide
    total, best = history_signals(both, table, items)
    assert total[0].tolist() == pytest.approx([-0.7, 0.0])
    assert best[0].tolist() == pytest.approx([-0.2, 0.0])  # every history item holds a weight
    one = Histories(np.array([0, 1]), np.array([0]), 3)
    assert history_signals(one, table, items)[1][0].tolist() == pytest.approx([-0.5, 0.0])


def test_neighbor_tables_check_rows_and_catalogs() -> None:
    table = NeighborTable(np.array([[1, 3, 3], [0, 2, 3], [3, 3, 3]]), np.ones((3, 3)))
    assert table.lengths.tolist() == [1, 2, 0]  # pads (item row 3) do not count
    with pytest.raises(ValueError, match="item rows"):
        NeighborTable(np.array([[4], [0], [1]]), np.ones((3, 1)))  # past the pad row
    other = NeighborTable(np.full((4, 1), 4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="different catalogs"):
        JointNeighbors.of((table, other))


def test_one_users_recent_history_equals_the_batch_rows() -> None:
    # The one-row read (a request's user) is a slice; it must give what the batch read gives
    # for that row, for every cap, and a copy the caller may change.
    hist = Histories.from_matrix(random_history(3, 12, 30, 0.3))
    empty = Histories(np.array([0, 0, 4]), np.array([3, 1, 2, 0]), 30)
    for h in (hist, empty):
        for cap in (0, 1, 3, 100):
            batch = h.recent(np.arange(h.n_rows), cap)
            for u in range(h.n_rows):
                one = h.recent(np.array([u]), cap)
                np.testing.assert_array_equal(one.indptr, [0, batch.lengths[u]])
                np.testing.assert_array_equal(one.items, batch.row(u))
                assert one.items.dtype == one.indptr.dtype == np.int64
        for row in (-1, -2, h.n_rows):  # -2 read the last row before the batch path checked
            with pytest.raises(IndexError, match=f"row {row} is outside"):
                h.recent(np.array([row]), 0)
            with pytest.raises(IndexError, match=f"row {row} is outside"):
                h.recent(np.array([0, row]), 0)
    one = hist.recent(np.array([0]), 0)
    one.items[:] = -7
    assert (hist.items >= 0).all()


def test_feature_tables_pickle_to_the_same_features() -> None:
    # The Ray engine ships tables by pickle: the joint table is rebuilt from cooc and ease.
    import pickle

    tables, cands, _ = small_world(seed=3)
    again = pickle.loads(pickle.dumps(tables))
    assert np.shares_memory(again.cooc.values, again.neighbors.values)
    np.testing.assert_array_equal(
        candidate_features(again, cands).values, candidate_features(tables, cands).values
    )


def test_histories_newest_first_and_capped() -> None:
    # user 0 saw items 4 (t=30), 1 (t=10), 7 (t=20) and 1 again (t=50); user 1 nothing.
    times = latest_times(
        np.array([0, 0, 0, 0]), np.array([4, 1, 7, 1]), np.array([30, 10, 20, 50]), (2, 9)
    )
    observed = times.copy()
    observed.data[:] = 1.0
    hist = Histories.from_matrix(observed, times)
    np.testing.assert_array_equal(hist.row(0), [1, 4, 7])
    np.testing.assert_array_equal(hist.row(1), [])
    np.testing.assert_array_equal(hist.recent(np.array([0, 1, 0]), 2).items, [1, 4, 1, 4])
    np.testing.assert_array_equal(hist.recent(np.array([0]), 2).lengths, [2])
    # A request's items, oldest first, with a repeat: newest first, each once.
    np.testing.assert_array_equal(Histories.from_items(np.array([3, 5, 3, 8]), 9).items, [8, 3, 5])
    with pytest.raises(ValueError, match="item rows"):
        Histories(np.array([0, 1]), np.array([9]), 9)


def test_history_ties_and_untimed_items_go_by_item_row() -> None:
    observed = sp.csr_matrix(np.array([[1, 1, 1, 1, 1]], dtype=np.float32))
    # Items 1 and 3 tie at t=5, item 4 is newest; items 0 and 2 have no time.
    times = sp.csr_matrix(np.array([[0.0, 5.0, 0.0, 5.0, 9.0]]))
    np.testing.assert_array_equal(Histories.from_matrix(observed, times).row(0), [4, 1, 3, 0, 2])
    with pytest.raises(ValueError, match="decrease"):
        Histories(np.array([0, 2, 1, 2]), np.array([0, 1]), 3)


def capped_history() -> tuple[sp.csr_matrix, np.ndarray, FeatureTables]:
    """u0 saw 0 (t=3), 1 (t=1), 2 (t=2); u1 saw 1 and 3, so 1 and 3 co-occur, and 0, 1, 2 do.
    Return the history, all-ones item vectors and the tables with a history cap of 2."""
    history = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float32))
    times = sp.csr_matrix(np.array([[3.0, 1.0, 2.0, 0], [0, 1.0, 0, 1.0]]))
    vecs = np.ones((4, 2), dtype=np.float32)
    config = FeatureConfig(history_cap=2, ease_lambda=0)
    return history, vecs, build_feature_tables(history, vecs[:2], vecs, config=config, time=times)


def test_the_history_cap_reads_the_newest_items_only() -> None:
    history, vecs, tables = capped_history()
    users = known_users(tables, np.array([0]))
    np.testing.assert_array_equal(users.history.items, [0, 2])  # newest two: 0 then 2
    assert users.n_history.tolist() == [3]
    # For candidate 3, only item 1 co-occurs, and it is the oldest: beyond the cap.
    cands = Candidates(np.array([0]), np.array([[3]]), np.array([[0.0]]))
    feats = candidate_features(tables, cands)
    assert feats.values[0, 0, tables.layout.column["cooc_sum"]] == 0.0
    wide = build_feature_tables(history, vecs[:2], vecs, config=FeatureConfig(ease_lambda=0))
    assert candidate_features(wide, cands).values[0, 0, wide.layout.column["cooc_sum"]] > 0


def test_cooc_mean_divides_by_the_items_read_and_user_log_history_counts_them_all() -> None:
    # The data of the test above: u0's newest two are 0 and 2, its whole history 3 items.
    _, _, tables = capped_history()
    # Candidate 1 (counts: item 0 once, 1 twice, 2 once): C[0, 1] = C[2, 1] = 1 / sqrt(2).
    cands = Candidates(np.array([0]), np.array([[1]]), np.array([[0.0]]))
    got = candidate_features(tables, cands).values[0, 0]
    col = tables.layout.column
    assert got[col["cooc_sum"]] == pytest.approx(2**0.5, rel=1e-6)
    assert got[col["cooc_mean"]] == pytest.approx(2**0.5 / 2, rel=1e-6)  # 2 items read, not 3
    assert got[col["user_log_history"]] == pytest.approx(np.log1p(3), rel=1e-6)  # all 3 count


def test_item_statistics_come_from_item_history_and_user_rows_from_history() -> None:
    history = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    items_seen = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float32))
    vecs = np.eye(4, 2, dtype=np.float32)
    config = FeatureConfig(ease_lambda=0)
    tables = build_feature_tables(history, vecs[:2], vecs, config=config, item_history=items_seen)
    np.testing.assert_allclose(tables.item_log_popularity, np.log1p([1, 2, 1, 1]))
    assert tables.cooc.to_csr()[1, 3] == pytest.approx(1 / np.sqrt(2), rel=1e-6)
    np.testing.assert_array_equal(tables.history.row(0), [0])
    with pytest.raises(ValueError, match="item_history"):
        build_feature_tables(history, vecs[:2], vecs, config=config, item_history=items_seen[:1])


def test_side_matrix_standardizes_numerics_and_one_hots_up_to_max_onehot() -> None:
    table = FeatureTable(
        4,
        categorical={"a": np.array([0, 1, 2, 1]), "b": np.array([0, 1, 2, 3])},
        cardinality={"a": 3, "b": 4},
        numeric={"x": np.array([1.0, 2.0, 3.0, 6.0], np.float32)},
    )
    values, names = side_matrix(table, 4, max_onehot=3)  # "a" has exactly 3 values: kept
    assert names == ("a=0", "a=1", "a=2", "x")
    np.testing.assert_array_equal(values[:, :3], np.eye(3)[[0, 1, 2, 1]])
    x = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(values[:, 3], (x - 3.0) / x.std(), rtol=1e-6)
    with pytest.raises(ValueError, match="expected 5"):
        side_matrix(table, 5, max_onehot=3)


def test_auto_ease_is_exact_up_to_and_at_ease_max_items() -> None:
    config = FeatureConfig(ease_max_items=20)
    assert config.ease_is_exact(20) and not config.ease_is_exact(21)


def test_local_ease_over_every_neighbour_is_exact_ease() -> None:
    # Each column of EASE is the ridge regression of that item on all the others, so the local
    # regression over a full neighbourhood is EASE itself.
    history = random_history(6, 80, 15, 0.5)
    cooc = cooccurrence_table(history, k=100)
    assert (cooc.lengths == 14).all()  # every pair co-occurs
    exact = ease_exact_table(history, 20.0, 100).to_csr().toarray()
    local = ease_local_table(history, cooc, 20.0, 100, local_neighbors=14).to_csr().toarray()
    np.testing.assert_allclose(local, exact, atol=1e-4)
    # A smaller neighbourhood is an approximation, but still mostly agrees in sign.
    small = ease_local_table(history, cooc, 20.0, 100, local_neighbors=5).to_csr().toarray()
    both = (small != 0) & (np.abs(exact) > 1e-3)
    assert both.sum() > 30 and (np.sign(small[both]) == np.sign(exact[both])).mean() > 0.7


def local_ease_reference(history: sp.csr_matrix, cooc: NeighborTable, l2: float, local: int):
    """Dense loops over the docstring of ``ease_local_table``: ``(I, I)`` ``B[h, j]``."""
    x = (history.toarray() > 0).astype(np.float64)
    gram = x.T @ x
    n = gram.shape[0]
    near = [[h for h in cooc.indices[j, :local] if h < n] for j in range(n)]
    b = np.zeros((n, n))
    for j in range(n):
        s = near[j]
        if not s:
            continue
        g = np.zeros((len(s), len(s)))
        for p, a in enumerate(s):
            for q, c in enumerate(s):
                if a == c:
                    g[p, q] = gram[a, a] + l2
                elif c in near[a] or a in near[c]:  # a pair held in either row counts
                    g[p, q] = gram[a, c]
        b[s, j] = np.linalg.solve(g, gram[s, j])
    return b


def test_local_ease_over_small_neighbourhoods_equals_dense_loops() -> None:
    history = random_history(11, 60, 25, 0.12)
    cooc = cooccurrence_table(history, k=100)
    assert len(set(np.minimum(cooc.lengths, 5).tolist())) > 1  # neighbourhoods of several sizes
    want = local_ease_reference(history, cooc, 5.0, 5)
    full = ease_local_table(history, cooc, 5.0, 100, local_neighbors=5).to_csr().toarray()
    np.testing.assert_allclose(full, want.T, atol=1e-5)
    # Each row keeps its k largest weights by magnitude: on denser data several rows' strongest
    # weights include a negative one that the k largest by value would drop.
    history = random_history(2, 30, 15, 0.5)
    cooc = cooccurrence_table(history, k=100)
    want = local_ease_reference(history, cooc, 1.0, 4).T  # (I, I): row j holds B[., j]
    k = 2
    kept = ease_local_table(history, cooc, 1.0, k, local_neighbors=4).to_csr().toarray()
    top = np.zeros_like(want)
    for j, row in enumerate(want):
        strongest = np.argsort(-np.abs(row), kind="stable")[:k]
        top[j, strongest] = row[strongest]
    assert (top < 0).sum() >= 5
    np.testing.assert_allclose(kept, top, atol=1e-5)


def test_ease_method_auto_switches_at_the_threshold() -> None:
    history = random_history(7, 40, 20, 0.3)
    vecs = np.zeros((20, 2), dtype=np.float32)
    exact = build_feature_tables(history, vecs[:1].repeat(40, 0), vecs, config=WIDE)
    local_config = FeatureConfig(ease_max_items=10, ease_local_neighbors=4)
    local = build_feature_tables(history, vecs[:1].repeat(40, 0), vecs, config=local_config)
    assert WIDE.ease_is_exact(20) and not local_config.ease_is_exact(20)
    assert (local.ease.lengths <= 4).all()
    assert (exact.ease.to_csr() != local.ease.to_csr()).nnz > 0


def test_tables_round_trip_through_their_file(tmp_path) -> None:
    tables, cands, _ = small_world(seed=8, config=FeatureConfig(history_cap=5))
    layout = save_tables(tmp_path / "f.safetensors", tables)
    loaded = load_tables(tmp_path / "f.safetensors", layout, tables.user_vecs, tables.item_vecs)
    np.testing.assert_array_equal(
        candidate_features(loaded, cands).values, candidate_features(tables, cands).values
    )
    assert loaded.config == tables.config
    bad = {**layout, "feature_names": layout["feature_names"][:-1]}
    with pytest.raises(ValueError, match="feature names"):
        load_tables(tmp_path / "f.safetensors", bad, tables.user_vecs, tables.item_vecs)
    with pytest.raises(ValueError, match="users"):
        load_tables(
            tmp_path / "f.safetensors", {**layout, "n_users": 3}, tables.user_vecs, tables.item_vecs
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [("history_cap", 0), ("cooc_neighbors", 0), ("ease_method", "magic"), ("ease_lambda", -1.0)],
)
def test_feature_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        FeatureConfig(**{field: value})


def test_rank_columns_rank_within_the_list() -> None:
    tables, cands, _ = small_world(seed=5)
    feats = candidate_features(tables, cands)
    col = tables.layout.column
    for name in ("ease_score", "cooc_sum"):
        for row in range(len(cands.items)):  # every row: one row's ranks written to another
            signal = feats.values[row, :, col[name]]
            rank = np.expm1(feats.values[row, :, col[f"{name}_rank"]]).round().astype(int)
            real = cands.mask[row]
            expected = np.argsort(np.argsort(-signal[real], kind="stable"), kind="stable")
            np.testing.assert_array_equal(rank[real], expected)
            assert (rank[~real] == 0).all()
            # To the bit: log1p computed in float64, then rounded once (what rankers saw).
            log_rank = np.log1p(np.arange(cands.items.shape[1], dtype=np.float64))
            written = feats.values[row, real, col[f"{name}_rank"]]
            want = log_rank.astype(np.float32)[expected]
            np.testing.assert_array_equal(written.view(np.uint32), want.view(np.uint32))


def test_a_pad_takes_no_rank_from_real_candidates_with_negative_signals() -> None:
    """Real candidates whose EASE score is below 0 rank 0, 1, ... among themselves; a pad
    (whose signal reads 0) never ranks ahead of them."""
    tables, _, _ = small_world(seed=5)
    col = tables.layout.column
    n_users, n_items = tables.n_users, tables.n_items
    everything = Candidates(
        np.arange(n_users),
        np.tile(np.arange(n_items), (n_users, 1)),
        np.zeros((n_users, n_items), dtype=np.float32),
    )
    ease = candidate_features(tables, everything).values[:, :, col["ease_score"]]
    u = int(np.argmax((ease < 0).sum(axis=1)))
    negative = np.flatnonzero(ease[u] < 0)[:4]
    assert len(negative) >= 2
    cands = Candidates(np.array([u]), np.array([[-1, *negative]]), np.zeros((1, 5)))
    feats = candidate_features(tables, cands)
    rank = np.expm1(feats.values[0, 1:, col["ease_score_rank"]]).round().astype(int)
    expected = np.argsort(np.argsort(-ease[u, negative], kind="stable"), kind="stable")
    np.testing.assert_array_equal(rank, expected)


def test_item_blocks_cover_the_items_within_the_budget() -> None:
    """Blocks are consecutive, cover every item, and hold at most ``budget`` cost each
    unless one item alone exceeds it; a block ends only where the next item would overflow."""
    cost = np.array([3, 1, 4, 1, 5, 9, 2, 6, 0, 0, 3], dtype=np.float64)
    blocks = _item_blocks(cost, 6)
    assert blocks == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 10), (10, 11)]
    for a, b in blocks:
        assert cost[a:b].sum() <= 6 or b - a == 1


def test_item_item_tables_are_reused_from_a_subset_of_the_history() -> None:
    """``item_item``: co-occurrence and EASE come from the given tables (here built from
    u0's row alone); the user rows, popularity and vectors from ``history``."""
    history = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float32))
    subset = history.multiply(np.array([[1], [0], [0]])).tocsr()
    vecs = np.eye(4, 2, dtype=np.float32)
    config = FeatureConfig(ease_lambda=10.0)
    shared = build_feature_tables(subset, vecs[:3], vecs, config=config)
    tables = build_feature_tables(history, vecs[:3], vecs, config=config, item_item=shared)
    # Only u0's {0, 1} co-occur in the subset: item 0's one neighbour is item 1.
    np.testing.assert_array_equal(
        tables.cooc.to_csr().toarray(), [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(tables.ease.indices, shared.ease.indices)
    np.testing.assert_array_equal(tables.ease.values, shared.ease.values)
    np.testing.assert_allclose(tables.item_log_popularity, np.log1p([2, 3, 1, 1]))
    assert tables.history.matrix().nnz == history.nnz
    with pytest.raises(ValueError, match="another config or catalog"):
        build_feature_tables(history, vecs[:3], vecs, config=FeatureConfig(), item_item=shared)


def test_list_stats_columns_match_a_per_user_loop() -> None:
    config = FeatureConfig(history_cap=3, list_stats=True)
    tables, cands, _ = small_world(seed=9, config=config)
    # Pad the tail of two lists, as mining does for users with few candidates.
    items = cands.items.copy()
    items[3, 8:] = -1
    items[11, 2:] = -1
    # A pad's retrieval score is whatever the miner left there: it must not enter the z-scores.
    cands = Candidates(cands.user, items, np.where(items >= 0, cands.retrieval_score, 50.0))
    feats = candidate_features(tables, cands)
    col = tables.layout.column
    plain = candidate_features(
        dataclasses.replace(tables, config=FeatureConfig(history_cap=3)), cands
    )
    assert feats.names[: len(plain.names)] == plain.names  # appended: the old columns stay put
    np.testing.assert_array_equal(feats.values[:, :, : len(plain.names)], plain.values)
    for row in range(len(cands.user)):
        real = cands.mask[row]
        for name in ("retrieval_score", "cooc_sum", "ease_score"):
            x = feats.values[row, real, col[name]].astype(np.float64)
            std = x.std()
            want = (x - x.mean()) / (std if std > 0 else 1.0)
            np.testing.assert_allclose(feats.values[row, real, col[f"{name}_z"]], want, atol=1e-5)
        newest = tables.history.row(cands.user[row])[:3]
        mean = tables.item_log_popularity[newest].mean() if len(newest) else 0.0
        np.testing.assert_allclose(
            feats.values[row, real, col["user_mean_popularity"]], mean, rtol=1e-6
        )
        gap = tables.item_log_popularity[cands.items[row, real]] - mean
        np.testing.assert_allclose(feats.values[row, real, col["popularity_gap"]], gap, atol=1e-6)
        assert not feats.values[row, ~real].any()
