"""A synthetic interaction world with a known truth, at any size, streamed in user blocks.

Items have a genre (Zipf-sized genres), a latent vector near their genre's centroid, a
Zipf-like popularity bias and a release year. Users have a few favourite genres, a country
(which shifts their taste), an age (which sets the era they prefer) and a latent taste vector.
A user's utility for an item is the generator's truth::

    utility(u, i) = taste_u . vec_i + bias_i - era_weight * ((year_i - era_u) / 20) ** 2

Interactions are drawn per user without ever forming a (users, items) matrix: a candidate pool
(popularity-weighted draws from each favourite genre, plus the most popular items) is scored,
and a Gumbel top-k over the pool picks the user's distinct items, so what a user interacts
with is a noisy sample of what they prefer. Timestamps come in sessions over ``days`` days.

Users are drawn in fixed blocks of :data:`BLOCK_USERS`, each from its own seeds derived from
``(seed, stream, block)`` (as in :mod:`slimrank.data.synthetic`), so the same seed gives the
same rows whatever chunk size the writer uses, and any user's taste can be recomputed without
the others: :func:`true_top_k` ranks every item for a set of users in blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from slimrank.config import Config, require

# Users per independently seeded block; fixed so that rows do not depend on the chunk size.
BLOCK_USERS = 4_096
WORLD_FILE = "world.json"
INTERACTIONS_FILE = "interactions.parquet"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
COUNTRIES = 12

_ITEM_STREAM = 0
_USER_STREAM = 1  # taste, age, country, counts: what the truth needs
_SAMPLE_STREAM = 2  # pools, Gumbel noise, timestamps


@dataclasses.dataclass(frozen=True)
class WorldConfig(Config):
    """Shape of a synthetic world.

    ``per_user`` is the mean number of interactions per user (log-normal spread
    ``count_spread``, at least ``min_per_user``). A user's pool holds ``pool_per_genre``
    popularity-weighted draws from each of ``genres_per_user`` favourite genres plus the
    ``popular_pool`` most popular items. ``zipf`` is the exponent of item popularity
    (``bias_i = -zipf * log(rank_i)``, scaled so that the top item's bias is ``pop_weight``).
    """

    n_users: int = 10_000
    n_items: int = 10_000
    per_user: float = 20.0
    min_per_user: int = 5
    count_spread: float = 0.6
    dim: int = 16
    n_genres: int = 40
    genre_zipf: float = 0.8
    genres_per_user: int = 3
    pool_per_genre: int = 200
    popular_pool: int = 100
    zipf: float = 0.6
    pop_weight: float = 2.0
    taste_scale: float = 2.5  # norm of a genre centroid: how much taste outweighs popularity
    taste_noise: float = 0.5
    item_noise: float = 0.6
    era_weight: float = 0.5
    start: int = 1_600_000_000  # unix seconds of the first possible interaction
    days: int = 365
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "min_per_user", "dim", "n_genres", "genres_per_user"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, self, name, value, "an int >= 1")
        require(self.per_user >= 1, self, "per_user", self.per_user, "must be >= 1")
        require(
            self.min_per_user < self.n_items,
            self,
            "min_per_user",
            self.min_per_user,
            f"must be below n_items={self.n_items}",
        )
        require(self.pool_per_genre >= 1, self, "pool_per_genre", self.pool_per_genre, ">= 1")
        require(self.popular_pool >= 0, self, "popular_pool", self.popular_pool, ">= 0")
        for name in (
            "count_spread",
            "genre_zipf",
            "zipf",
            "pop_weight",
            "taste_noise",
            "taste_scale",
        ):
            value = getattr(self, name)
            require(value >= 0, self, name, value, "must be >= 0")
        require(self.item_noise >= 0, self, "item_noise", self.item_noise, ">= 0")
        require(self.era_weight >= 0, self, "era_weight", self.era_weight, ">= 0")
        require(self.days >= 1, self, "days", self.days, "must be >= 1")
        require(self.seed >= 0, self, "seed", self.seed, "must be >= 0")

    @property
    def pool_size(self) -> int:
        """Candidates scored per user (before duplicates are dropped)."""
        return self.genres_per_user * self.pool_per_genre + min(self.popular_pool, self.n_items)


@dataclasses.dataclass(frozen=True)
class Items:
    """Every item's attributes; row ``i`` is item id ``i``."""

    genre: np.ndarray  # (I,) int64
    vec: np.ndarray  # (I, d) float32
    bias: np.ndarray  # (I,) float32, popularity
    year: np.ndarray  # (I,) float32
    centroids: np.ndarray  # (G, d) float32, genre centroids
    genre_weights: np.ndarray  # (G,) float64, sums to 1
    country_shift: np.ndarray  # (COUNTRIES, d) float32
    by_genre: np.ndarray  # (I,) int64, item ids sorted by genre
    genre_start: np.ndarray  # (G + 1,) int64, offsets into by_genre
    cum_weight: np.ndarray  # (I,) float64, cumulative exp(bias) along by_genre
    popular: np.ndarray  # (popular_pool,) int64, most popular items


@dataclasses.dataclass(frozen=True)
class Users:
    """Attributes of one block of users (what the truth needs)."""

    ids: np.ndarray  # (B,) int64
    genres: np.ndarray  # (B, genres_per_user) int64, favourite genres
    taste: np.ndarray  # (B, d) float32
    age: np.ndarray  # (B,) float32
    country: np.ndarray  # (B,) int64
    era: np.ndarray  # (B,) float32, preferred release year
    count: np.ndarray  # (B,) int64, interactions to draw


def make_items(config: WorldConfig) -> Items:
    """Return every item's attributes (seeded; independent of the users)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _ITEM_STREAM]))
    n, d, g = config.n_items, config.dim, config.n_genres
    centroids = rng.standard_normal((g, d))  # (G, d)
    centroids *= config.taste_scale / np.linalg.norm(centroids, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, g + 1) ** config.genre_zipf
    genre_weights = rng.permutation(weights / weights.sum())  # (G,)
    genre = rng.choice(g, size=n, p=genre_weights)  # (I,)
    vec = centroids[genre] + config.item_noise * rng.standard_normal((n, d)) / np.sqrt(d)
    rank = rng.permutation(n) + 1  # (I,) popularity rank, 1 = most popular
    bias = config.pop_weight - config.zipf * np.log(rank)  # (I,)
    year = np.clip(rng.normal(2000, 15, n), 1920, 2025).round()  # (I,)
    country_shift = 0.5 * rng.standard_normal((COUNTRIES, d)) / np.sqrt(d)
    order = np.argsort(genre, kind="stable")  # (I,)
    start = np.searchsorted(genre[order], np.arange(g + 1))  # (G + 1,)
    cum = np.cumsum(np.exp(bias[order] - bias.max()))  # (I,)
    popular = np.argsort(rank)[: min(config.popular_pool, n)]
    return Items(
        genre.astype(np.int64),
        vec.astype(np.float32),
        bias.astype(np.float32),
        year.astype(np.float32),
        centroids.astype(np.float32),
        genre_weights,
        country_shift.astype(np.float32),
        order.astype(np.int64),
        start.astype(np.int64),
        cum,
        popular.astype(np.int64),
    )


def user_block(config: WorldConfig, items: Items, block: int) -> Users:
    """Return the attributes of the users of one fixed block."""
    lo = block * BLOCK_USERS
    hi = min(config.n_users, lo + BLOCK_USERS)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _USER_STREAM, block]))
    b, d = BLOCK_USERS, config.dim  # whole blocks are drawn, so a smaller n_users is a prefix
    genres = rng.choice(config.n_genres, size=(b, config.genres_per_user), p=items.genre_weights)
    country = rng.integers(0, COUNTRIES, b)  # (B,)
    age = rng.uniform(16, 75, b)  # (B,)
    taste = items.centroids[genres].mean(axis=1) + items.country_shift[country]  # (B, d)
    taste += config.taste_noise * rng.standard_normal((b, d)) / np.sqrt(d)
    era = 2020 - age + rng.normal(0, 5, b) + 15  # (B,) people like what came out in their youth
    mu = np.log(config.per_user) - config.count_spread**2 / 2
    count = np.exp(rng.normal(mu, config.count_spread, b)).round()  # (B,)
    cap = min(config.pool_size, config.n_items)
    count = np.clip(count, config.min_per_user, max(config.min_per_user, cap // 2))
    keep = slice(0, hi - lo)
    return Users(
        np.arange(lo, hi, dtype=np.int64),
        genres[keep].astype(np.int64),
        taste[keep].astype(np.float32),
        age[keep].astype(np.float32),
        country[keep].astype(np.int64),
        era[keep].astype(np.float32),
        count[keep].astype(np.int64),
    )


def utility(config: WorldConfig, items: Items, users: Users, item_ids: np.ndarray) -> np.ndarray:
    """Return the true utility of ``item_ids`` for each user: ``(B, C)`` for ``(B, C)`` ids
    or ``(B, I')`` for a 1-D array of ``I'`` ids."""
    ids = np.asarray(item_ids)
    if ids.ndim == 1:
        score = users.taste @ items.vec[ids].T  # (B, I')
        gap = (items.year[ids][None, :] - users.era[:, None]) / 20.0  # (B, I')
        return score + items.bias[ids][None, :] - config.era_weight * gap**2
    score = np.einsum("bd,bcd->bc", users.taste, items.vec[ids])  # (B, C)
    gap = (items.year[ids] - users.era[:, None]) / 20.0  # (B, C)
    return score + items.bias[ids] - config.era_weight * gap**2


def _sample_block(config: WorldConfig, items: Items, users: Users, block: int) -> dict:
    """Return one block's interactions as columns (user, item, timestamp), user-major."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SAMPLE_STREAM, block]))
    b = BLOCK_USERS
    per, k = config.pool_per_genre, config.genres_per_user
    # Popularity-weighted draws inside each favourite genre: uniform points on the genre's
    # stretch of the cumulative weight, located by binary search.
    genres = np.zeros((b, k), dtype=np.int64)
    genres[: len(users.ids)] = users.genres
    lo, hi = items.genre_start[genres], items.genre_start[genres + 1]  # (B, k)
    base = np.where(lo > 0, items.cum_weight[np.maximum(lo - 1, 0)], 0.0)  # (B, k)
    top = items.cum_weight[np.maximum(hi - 1, 0)]  # (B, k)
    u = rng.random((b, k, per))  # (B, k, per)
    points = base[..., None] + u * (top - base)[..., None]
    # Sorted points search about twice as fast (the table stays in cache); same result.
    flat = points.reshape(-1)
    by_point = np.argsort(flat, kind="stable")
    pos = np.empty(flat.shape, dtype=np.int64)
    pos[by_point] = np.searchsorted(items.cum_weight, flat[by_point], side="right")
    pos = pos.reshape(points.shape)
    pos = np.clip(pos, lo[..., None], np.maximum(hi - 1, lo)[..., None])  # empty genre: any
    pool = items.by_genre[np.minimum(pos, config.n_items - 1)].reshape(b, k * per)
    pool = np.concatenate([pool, np.broadcast_to(items.popular, (b, len(items.popular)))], 1)
    gumbel = rng.gumbel(size=pool.shape)  # (B, C)
    session = rng.integers(3, 9, b)  # (B,) items per session
    start = rng.random(b)  # (B,) where in the period the user's first interaction falls
    gaps = rng.exponential(3 * 86_400, pool.shape)  # (B, C) seconds between sessions
    steps = rng.integers(30, 900, pool.shape)  # (B, C) seconds within a session
    met = rng.random(pool.shape)  # (B, C) the order the user meets the picked items
    n = len(users.ids)
    pool = pool[:n]
    score = utility(config, items, users, pool) + gumbel[:n]  # (n, C)
    # Each item once per user: sort the pool, drop repeats.
    by_item = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, by_item, 1)
    repeat = np.zeros(pool.shape, dtype=bool)
    repeat[:, 1:] = sorted_pool[:, 1:] == sorted_pool[:, :-1]
    sorted_score = np.take_along_axis(score, by_item, 1)
    sorted_score[repeat] = -np.inf
    np.put_along_axis(score, by_item, sorted_score, 1)
    count = np.minimum(users.count, (~repeat).sum(axis=1))  # (n,)
    # Gumbel top-k: the count_u best perturbed utilities, without replacement.
    best = np.argsort(-score, axis=1, kind="stable")  # (n, C)
    j = np.arange(pool.shape[1])[None, :]
    taken = j < count[:, None]  # (n, C)
    picked = np.take_along_axis(pool, best, 1)
    # Time order: the picked items in a random order, in sessions of session_u items.
    seq = np.argsort(np.where(taken, met[:n], np.inf), axis=1, kind="stable")
    picked = np.take_along_axis(picked, seq, 1)
    new_session = (j % session[:n, None]) == 0
    elapsed = np.cumsum(np.where(new_session, gaps[:n], steps[:n]), axis=1)  # (n, C)
    elapsed -= elapsed[:, :1]
    period = config.days * 86_400
    span = np.take_along_axis(elapsed, np.maximum(count - 1, 0)[:, None], 1)[:, 0]  # (n,)
    squeeze = np.minimum(1.0, 0.9 * period / np.maximum(span, 1.0))  # (n,) fit in the period
    span = span * squeeze
    first = config.start + start[:n] * (period - span)  # (n,)
    stamp = (first[:, None] + elapsed * squeeze[:, None]).astype(np.int64)
    return {
        "user_id": np.repeat(users.ids, count),
        "item_id": picked[taken].astype(np.int64),
        "timestamp": stamp[taken],
    }


def n_blocks(config: WorldConfig) -> int:
    """Return how many user blocks the world has."""
    return -(-config.n_users // BLOCK_USERS)


def chunk_blocks(config: WorldConfig, chunk_users: int) -> Iterator[range]:
    """Yield the user blocks of each chunk of about ``chunk_users`` users (whole blocks)."""
    require(chunk_users >= 1, "chunk_blocks", "chunk_users", chunk_users, "must be >= 1")
    per_chunk = max(1, round(chunk_users / BLOCK_USERS))
    for first in range(0, n_blocks(config), per_chunk):
        yield range(first, min(n_blocks(config), first + per_chunk))


def iter_interactions(
    config: WorldConfig, chunk_users: int = BLOCK_USERS, items: Items | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield interaction columns for about ``chunk_users`` users at a time, user-major.

    The rows do not depend on ``chunk_users``: blocks are always :data:`BLOCK_USERS` users.
    """
    items = items if items is not None else make_items(config)
    for blocks in chunk_blocks(config, chunk_users):
        yield _concat(
            [_sample_block(config, items, user_block(config, items, b), b) for b in blocks]
        )


def iter_users(config: WorldConfig, items: Items | None = None) -> Iterator[Users]:
    """Yield every user block's attributes in order."""
    items = items if items is not None else make_items(config)
    for block in range(n_blocks(config)):
        yield user_block(config, items, block)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def true_top_k(
    config: WorldConfig,
    users: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    allowed: np.ndarray | None = None,
    items: Items | None = None,
    block_items: int = 262_144,
) -> np.ndarray:
    """Return the ``k`` items of highest true utility for each of ``users`` (world ids).

    ``exclude`` (``(n_users, n_items)`` over world ids, e.g. the training interactions) masks
    items out; ``allowed`` (bool ``(n_items,)``) keeps only those items (e.g. the ones the
    log has, which are all a recommender can return). Users are scored block by block
    against ``block_items`` items at a time, so memory stays near ``BLOCK_USERS x
    block_items`` floats. Ties go to the lower item id.
    Returns int64 ``(len(users), k)``.
    """
    users = np.asarray(users, dtype=np.int64)
    require(0 < k <= config.n_items, "true_top_k", "k", k, f"must be in 1..{config.n_items}")
    if users.size and (users.min() < 0 or users.max() >= config.n_users):
        raise ValueError(f"true_top_k: user ids must lie in [0, {config.n_users})")
    items = items if items is not None else make_items(config)
    out = np.zeros((len(users), k), dtype=np.int64)
    excl = sp.csr_matrix(exclude) if exclude is not None else None
    blocks = users // BLOCK_USERS
    for block in np.unique(blocks):
        rows = np.flatnonzero(blocks == block)
        attrs = user_block(config, items, int(block))
        local = users[rows] - block * BLOCK_USERS
        sub = dataclasses.replace(
            attrs,
            ids=attrs.ids[local],
            taste=attrs.taste[local],
            era=attrs.era[local],
            genres=attrs.genres[local],
            age=attrs.age[local],
            country=attrs.country[local],
            count=attrs.count[local],
        )
        best_s = np.full((len(rows), k), -np.inf, dtype=np.float64)
        best_i = np.full((len(rows), k), np.iinfo(np.int64).max)  # after any real item
        for lo in range(0, config.n_items, block_items):
            ids = np.arange(lo, min(config.n_items, lo + block_items))
            score = utility(config, items, sub, ids).astype(np.float64)  # (b, I')
            if allowed is not None:
                score[:, ~allowed[lo : lo + len(ids)]] = -np.inf
            if excl is not None:
                m = excl[users[rows]][:, lo : lo + len(ids)].tocoo()
                score[m.row, m.col] = -np.inf
            both_s = np.concatenate([best_s, score], axis=1)
            both_i = np.concatenate([best_i, np.broadcast_to(ids, score.shape)], axis=1)
            best_s, best_i = top_k_by_score(both_s, both_i, k)
        out[rows] = best_i
    return out


def top_k_by_score(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return each row's ``k`` entries of highest score, ties to the lower id, in that order:
    ``(scores, ids)``, both ``(B, k)``; the same as sorting each whole row by ``(-score, id)``.

    A partition finds each row's k-th highest score; only the entries at or above it (k
    and their ties) are sorted, so a row of ``n`` costs O(n) and not a sort of ``n``: 84% of
    the 1M truth step's time went to the full sort. NaN scores are not supported.
    """
    n = scores.shape[1]
    if k <= 0 or len(scores) == 0:
        return scores[:, :0].copy(), ids[:, :0].copy()
    if n <= k:
        order = np.lexsort((ids, -scores), axis=1)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    kth = np.partition(scores, n - k, axis=1)[:, n - k]  # (B,) the k-th highest
    rows, cols = np.nonzero(scores >= kth[:, None])  # row-major: k or more per row
    counts = np.bincount(rows, minlength=len(scores))
    width = int(counts.max())
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand_s = np.full((len(scores), width), -np.inf, dtype=scores.dtype)
    cand_i = np.full((len(scores), width), np.iinfo(np.int64).max, dtype=np.int64)
    cand_s[rows, slot] = scores[rows, cols]
    cand_i[rows, slot] = ids[rows, cols]  # the fill sorts after any real entry
    order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def item_table(config: WorldConfig, items: Items | None = None) -> dict[str, np.ndarray]:
    """Return the item side features: ``item_id``, ``genre`` (``g<N>``) and ``year``."""
    items = items if items is not None else make_items(config)
    genre = np.char.add("g", items.genre.astype(str)).astype(object)
    return {
        "item_id": np.arange(config.n_items, dtype=np.int64),
        "genre": genre,
        "year": items.year,
    }


def user_table(users: Users) -> dict[str, np.ndarray]:
    """Return the user side features of a block: ``user_id``, ``age`` and ``country``."""
    country = np.char.add("c", users.country.astype(str)).astype(object)
    return {"user_id": users.ids, "age": users.age, "country": country}


def write_world(
    config: WorldConfig,
    out: str | Path,
    chunk_users: int = 65_536,
    progress: object = None,
) -> dict[str, int]:
    """Write ``interactions.parquet``, ``users.parquet``, ``items.parquet`` and ``world.json``.

    ``items.parquet`` lists the items that appear in the log (a catalog item nobody touched
    is unknown to the logs, and the logs loader refuses feature rows of unknown ids).
    Streams ``chunk_users`` users at a time (one Parquet row group each). ``progress`` is
    called as ``progress(users_done, n_users)`` after each chunk. Returns the row counts.

    The files are written into a staging directory beside ``out`` and moved into it only
    when all four are complete, so a failed or interrupted run leaves ``out`` as it was.
    """
    require(chunk_users >= 1, "write_world", "chunk_users", chunk_users, "must be >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        counts = _write_world_files(config, staging, chunk_users, progress)
        out.mkdir(exist_ok=True)
        for name in (INTERACTIONS_FILE, USERS_FILE, ITEMS_FILE, WORLD_FILE):
            os.replace(staging / name, out / name)  # world.json last: it names a whole world
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _write_world_files(
    config: WorldConfig, out: Path, chunk_users: int, progress: object
) -> dict[str, int]:
    """Write the four files of :func:`write_world` into the existing directory ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = make_items(config)
    inter_schema = pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
    )
    user_schema = pa.schema(
        [("user_id", pa.int64()), ("age", pa.float32()), ("country", pa.string())]
    )
    rows = 0
    seen = np.zeros(config.n_items, dtype=bool)  # (I,)
    with (
        pq.ParquetWriter(out / INTERACTIONS_FILE, inter_schema) as inter_w,
        pq.ParquetWriter(out / USERS_FILE, user_schema) as user_w,
    ):
        for blocks in chunk_blocks(config, chunk_users):
            users = [user_block(config, items, b) for b in blocks]
            columns = _concat(
                [_sample_block(config, items, u, b) for u, b in zip(users, blocks, strict=True)]
            )
            inter_w.write_table(pa.table(columns, schema=inter_schema))
            user_w.write_table(
                pa.table(_concat([user_table(u) for u in users]), schema=user_schema)
            )
            rows += len(columns["user_id"])
            seen[columns["item_id"]] = True
            if progress is not None:
                progress(int(users[-1].ids[-1]) + 1, config.n_users)
    # Only items that appear in the log: a feature row for an unknown id is bad input.
    table = {key: value[seen] for key, value in item_table(config, items).items()}
    pq.write_table(pa.table(table), out / ITEMS_FILE)
    counts = {"users": config.n_users, "items": int(seen.sum()), "interactions": rows}
    (out / WORLD_FILE).write_text(
        json.dumps({"config": config.to_dict(), "counts": counts}, indent=2) + "\n"
    )
    return counts


def load_world_config(directory: str | Path) -> WorldConfig:
    """Return the config a world directory was generated with (its ``world.json``)."""
    data = json.loads((Path(directory) / WORLD_FILE).read_text())
    return WorldConfig.from_dict(data["config"])
