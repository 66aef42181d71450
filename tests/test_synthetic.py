"""The synthetic catalog: seeded, chunk-size independent, clustered."""

from __future__ import annotations

import numpy as np
import pytest

from slimrank.data.synthetic import (
    BLOCK_ROWS,
    SyntheticConfig,
    items,
    iter_items,
    iter_queries,
    make_mixture,
    queries,
    write_items_npy,
)

CONFIG = SyntheticConfig(n_items=2 * BLOCK_ROWS + 1234, dim=8, n_clusters=20, seed=7)


def _concat(chunks) -> np.ndarray:
    starts, parts = zip(*chunks, strict=True)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    assert list(starts) == list(offsets)
    return np.concatenate(parts)


@pytest.mark.parametrize("chunk_rows", [1_000, 7_777, BLOCK_ROWS, 100_000])
def test_same_seed_same_items_whatever_the_chunk_size(chunk_rows: int) -> None:
    reference = items(CONFIG, chunk_rows=BLOCK_ROWS * 4)
    got = _concat(iter_items(CONFIG, chunk_rows=chunk_rows))
    assert got.shape == (CONFIG.n_items, CONFIG.dim)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference)


def test_queries_do_not_depend_on_chunk_size_and_streams_differ() -> None:
    a = _concat(iter_queries(CONFIG, 5_000, chunk_rows=333))
    np.testing.assert_array_equal(a, queries(CONFIG, 5_000))
    b = queries(CONFIG, 5_000, stream=1)
    assert not np.array_equal(a, b)


def test_other_seed_gives_other_items_and_fewer_items_a_prefix() -> None:
    other = SyntheticConfig(n_items=1_000, dim=8, n_clusters=20, seed=8)
    same = SyntheticConfig(n_items=1_000, dim=8, n_clusters=20, seed=7)
    assert not np.array_equal(items(other), items(same))
    np.testing.assert_array_equal(items(same), items(CONFIG)[:1_000])


def test_items_cluster_around_unit_centroids() -> None:
    mixture = make_mixture(CONFIG)
    np.testing.assert_allclose(np.linalg.norm(mixture.centroids, axis=1), 1.0, rtol=1e-5)
    x = items(CONFIG)[:5_000]
    dist = np.linalg.norm(x[:, None, :] - mixture.centroids[None], axis=2)  # (n, C)
    nearest = dist.min(axis=1)
    between = np.linalg.norm(mixture.centroids[:, None] - mixture.centroids[None], axis=2)
    typical_gap = np.median(between[np.triu_indices(len(between), 1)])
    assert np.median(nearest) < 0.5 * typical_gap
    # queries are drawn near the same clusters, a little wider
    q = queries(CONFIG, 2_000)
    q_nearest = np.linalg.norm(q[:, None, :] - mixture.centroids[None], axis=2).min(axis=1)
    assert np.median(nearest) < np.median(q_nearest) < typical_gap


def test_write_items_npy_matches_in_memory(tmp_path) -> None:
    small = SyntheticConfig(n_items=BLOCK_ROWS + 5, dim=4, n_clusters=3, seed=1)
    on_disk = write_items_npy(small, tmp_path / "items.npy", chunk_rows=999)
    np.testing.assert_array_equal(np.asarray(on_disk), items(small))
    loaded = np.load(tmp_path / "items.npy", allow_pickle=False)
    assert loaded.shape == (small.n_items, small.dim)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_items", 0), ("dim", 0), ("n_clusters", 0), ("cluster_std", 0.0), ("seed", -1)],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}={value!r}"):
        SyntheticConfig(**{field: value})


def test_bad_chunk_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        next(iter_items(CONFIG, chunk_rows=0))
