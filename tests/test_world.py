"""The synthetic world: seeded rows independent of the chunk size, a truth that matches an
independent brute-force ranking, logs that follow the truth, and the customer's logs path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from slimrank.cli import main
from slimrank.data.dataset import dataset_files, load_dataset
from slimrank.data.world import (
    BLOCK_USERS,
    WorldConfig,
    iter_interactions,
    iter_users,
    load_world_config,
    make_items,
    top_k_by_score,
    true_top_k,
    write_world,
)

SMALL = WorldConfig(
    n_users=BLOCK_USERS + 500, n_items=900, per_user=12, pool_per_genre=40, popular_pool=30, seed=3
)


def _all(config: WorldConfig, chunk: int) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(c) for c in iter_interactions(config, chunk)], ignore_index=True)


@pytest.fixture(scope="module")
def logs() -> pd.DataFrame:
    return _all(SMALL, BLOCK_USERS)


def test_same_seed_same_rows_whatever_the_chunk_size(logs: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(logs, _all(SMALL, 10 * BLOCK_USERS))
    pd.testing.assert_frame_equal(logs, _all(SMALL, 1))
    # Fewer users: the same rows for the users they share.
    fewer = _all(dataclasses.replace(SMALL, n_users=700), 1)
    pd.testing.assert_frame_equal(fewer, logs[logs.user_id < 700].reset_index(drop=True))
    other = _all(dataclasses.replace(SMALL, seed=4), 1)
    assert not logs.equals(other)


def test_logs_are_well_formed(logs: pd.DataFrame) -> None:
    assert not logs.duplicated(["user_id", "item_id"]).any()  # each item once per user
    per_user = logs.groupby("user_id").size()
    assert len(per_user) == SMALL.n_users and per_user.min() >= SMALL.min_per_user
    assert 0.8 * SMALL.per_user < per_user.mean() < 1.2 * SMALL.per_user
    assert logs.item_id.between(0, SMALL.n_items - 1).all()
    end = SMALL.start + SMALL.days * 86_400
    assert logs.timestamp.between(SMALL.start, end).all()
    # Sessions: within a user, most gaps are minutes, some are days.
    gaps = logs.sort_values(["user_id", "timestamp"]).groupby("user_id").timestamp.diff().dropna()
    assert (gaps < 900).mean() > 0.5 and (gaps > 86_400).mean() > 0.05


def test_long_histories_are_squeezed_into_the_period() -> None:
    """Over one day, sessions days apart cannot fit: each user's span is squeezed to 90% of
    the period, so every timestamp still lies inside ``[start, start + days)``."""
    config = WorldConfig(
        n_users=200, n_items=300, per_user=30, pool_per_genre=40, popular_pool=30, days=1
    )
    stamps = _all(config, BLOCK_USERS).timestamp
    assert stamps.between(config.start, config.start + 86_400).all()


def test_popularity_is_skewed(logs: pd.DataFrame) -> None:
    counts = np.sort(np.bincount(logs.item_id, minlength=SMALL.n_items))[::-1]
    top = counts[: SMALL.n_items // 100].sum() / counts.sum()
    assert top > 0.1  # the top 1% of items hold over 10x their share
    assert counts[SMALL.n_items // 2] < counts[0] / 20


def _reference_utility(config: WorldConfig, users: np.ndarray) -> np.ndarray:
    """Utility of every item for ``users``, item by item from the attributes (no blocks)."""
    items = make_items(config)
    attrs = [u for u in iter_users(config, items)]
    taste = np.concatenate([u.taste for u in attrs])[users].astype(np.float64)
    era = np.concatenate([u.era for u in attrs])[users].astype(np.float64)
    out = np.zeros((len(users), config.n_items))
    for i in range(config.n_items):
        gap = (float(items.year[i]) - era) / 20.0
        out[:, i] = taste @ items.vec[i].astype(np.float64) + items.bias[i] - 0.5 * gap**2
    return out


def test_true_top_k_is_the_brute_force_ranking(logs: pd.DataFrame) -> None:
    users = np.array([0, 5, BLOCK_USERS - 1, BLOCK_USERS, BLOCK_USERS + 499])
    ref = _reference_utility(SMALL, users)
    k = 20
    want = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(true_top_k(SMALL, users, k), want)
    np.testing.assert_array_equal(true_top_k(SMALL, users, k, block_items=7), want)
    # Excluding the training items and keeping only some items.
    seen = sp.csr_matrix(
        (np.ones(len(logs)), (logs.user_id, logs.item_id)), shape=(SMALL.n_users, SMALL.n_items)
    )
    allowed = np.arange(SMALL.n_items) % 3 != 0
    masked = ref.copy()
    masked[seen[users].toarray() > 0] = -np.inf
    masked[:, ~allowed] = -np.inf
    want = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    got = true_top_k(SMALL, users, k, exclude=seen, allowed=allowed, block_items=100)
    np.testing.assert_array_equal(got, want)


def test_true_top_k_ranks_the_whole_catalog_and_checks_user_ids() -> None:
    """``k = n_items`` is allowed (every item, best first); user id ``n_users`` is not, though
    its block holds attributes for it."""
    whole = true_top_k(SMALL, np.array([0]), SMALL.n_items)
    np.testing.assert_array_equal(np.sort(whole[0]), np.arange(SMALL.n_items))
    np.testing.assert_array_equal(whole[:, :20], true_top_k(SMALL, np.array([0]), 20))
    with pytest.raises(ValueError, match="user ids"):
        true_top_k(SMALL, np.array([SMALL.n_users]), 5)


@pytest.mark.parametrize("k", [1, 3, 10, 40, 60])
def test_top_k_by_score_equals_a_full_sort_with_ties_and_masked_entries(k: int) -> None:
    """Integer scores tie often, -inf (masked) entries fill rows short of k real ones, and
    ids run in no order: each row must match its whole row sorted by (-score, id)."""
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, size=(30, 50)).astype(np.float64)
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    scores[0] = -np.inf  # a row with nothing left
    scores[1, :] = 2.0  # a row of one tie
    ids = np.stack([rng.permutation(1000)[:50] for _ in range(30)])
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    got_s, got_i = top_k_by_score(scores, ids, k)
    np.testing.assert_array_equal(got_i, np.take_along_axis(ids, order, 1))
    np.testing.assert_array_equal(got_s, np.take_along_axis(scores, order, 1))


def test_top_k_by_score_of_nothing_is_empty() -> None:
    scores, ids = np.zeros((2, 3)), np.zeros((2, 3), dtype=np.int64)
    assert top_k_by_score(scores, ids, 0)[1].shape == (2, 0)
    assert top_k_by_score(scores[:0], ids[:0], 2)[1].shape == (0, 0)


def test_true_top_k_fills_short_rows_with_the_lowest_masked_ids() -> None:
    """With fewer allowed items than k, the masked items follow in id order, as a sort does."""
    users = np.array([1, 2])
    allowed = np.zeros(SMALL.n_items, dtype=bool)
    allowed[[7, 3, 11]] = True
    ref = _reference_utility(SMALL, users)
    ref[:, ~allowed] = -np.inf
    want = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    got = true_top_k(SMALL, users, 10, allowed=allowed, block_items=64)
    np.testing.assert_array_equal(got, want)
    assert set(got[0, :3]) == {3, 7, 11}


def test_users_interact_with_what_they_prefer(logs: pd.DataFrame) -> None:
    """The logs are a noisy sample of the truth: far more of a user's items are in their true
    top 50 than a popularity ranking puts there."""
    users = np.arange(0, SMALL.n_users, 17)
    top = true_top_k(SMALL, users, 50)
    by_user = logs.groupby("user_id").item_id.apply(set)
    popular = set(np.argsort(-np.bincount(logs.item_id, minlength=SMALL.n_items))[:50].tolist())
    hit = np.mean(
        [
            len(by_user[u] & set(t.tolist())) / len(by_user[u])
            for u, t in zip(users, top, strict=True)
        ]
    )
    pop_hit = np.mean([len(by_user[u] & popular) / len(by_user[u]) for u in users])
    assert hit > 0.5 and hit > pop_hit + 0.1


def test_generate_writes_logs_that_the_customer_path_reads(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "world"
    args = ["--users", "300", "--items", "200", "--interactions-per-user", "10", "--seed", "1"]
    assert main(["data", "generate", "world", *args, "--out", str(out)]) == 0
    config = load_world_config(out)
    assert (config.n_users, config.n_items, config.per_user, config.seed) == (300, 200, 10, 1)
    want = _all(config, BLOCK_USERS)
    dataset = load_dataset(str(out))
    assert dataset.n_users == 300 and len(dataset.interactions) == len(want)
    assert dataset.n_items == want.item_id.nunique()
    # External ids round-trip: the dataset's rows are the generator's rows.
    user = dataset.users.external(dataset.interactions.user).astype(int)
    item = dataset.items.external(dataset.interactions.item).astype(int)
    np.testing.assert_array_equal(user, want.user_id)
    np.testing.assert_array_equal(item, want.item_id)
    assert set(dataset.item_features.names) >= {"genre", "year"}
    assert set(dataset.user_features.names) >= {"age", "country"}
    # Each item's genre is the generator's.
    genre = dataset.item_features.categorical["genre"]
    vocab = np.asarray(dataset.item_features.vocab["genre"], dtype=object)
    world_genre = make_items(config).genre[
        dataset.items.external(np.arange(dataset.n_items)).astype(int)
    ]
    assert (vocab[genre] == np.char.add("g", world_genre.astype(str))).all()
    # The pipeline keys its data step by every file the load read (a changed table re-runs it).
    assert dataset_files(str(out)) == [
        out / "interactions.parquet",
        out / "users.parquet",
        out / "items.parquet",
    ]
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(want):,}" in printed and "genre" in printed


def test_bad_world_size_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["data", "generate", "world", "--users", "0", "--out", str(tmp_path / "w")])
    assert code != 0
    assert "n_users" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--chunk-users", "0"], "--chunk-users 0: must be >= 1"), ([], "not a directory")],
)
def test_bad_generate_flags_are_one_line_and_write_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path, flags: list[str], message: str
) -> None:
    """A bad ``--chunk-users`` or an ``--out`` that is a file: exit 2, no traceback, no files."""
    out = tmp_path / ("w" if flags else "a_file")
    if not flags:
        out.write_text("keep me")
    args = ["data", "generate", "world", "--users", "30", "--items", "50", *flags]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if flags:
        assert list(tmp_path.iterdir()) == []
    else:
        assert list(tmp_path.iterdir()) == [out] and out.read_text() == "keep me"


def test_an_interrupted_world_leaves_the_previous_one_whole(tmp_path) -> None:
    """A run that fails part way changes no file of ``out`` and leaves no staging behind."""
    out = tmp_path / "world"
    small = WorldConfig(n_users=60, n_items=80, per_user=8, seed=1)
    write_world(small, out, chunk_users=20)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(done: int, total: int) -> None:
        if done >= 20:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a long world

    with pytest.raises(KeyboardInterrupt):
        write_world(dataclasses.replace(small, seed=2), out, chunk_users=20, progress=interrupt)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]
    counts = write_world(dataclasses.replace(small, seed=2), out, chunk_users=20)
    assert load_world_config(out).seed == 2 and counts["users"] == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
