"""The peers the pipeline is compared with, all under one statement of what they may read.

**Equal information.** :func:`observed_interactions` is the one statement: when a system scores
the validation part it may read the training interactions; when it scores the test part it may
read the training and validation interactions (what a served system has). Every peer here is
selected on validation (fitted on train, scored on valid) and then refitted, with the selected
hyperparameters, on ``observed_interactions(split, "test")`` to score the test part. The
pipeline's test view reads the same: user vectors pooled over, and feature tables built from,
the training and validation interactions (:mod:`slimrank.pipeline.steps`).

Peers (Dacrema et al., "Are we really making much progress?", RecSys 2019, found the neighbour
models hard to beat):

- most popular: item counts;
- EASE (Steck, "Embarrassingly shallow autoencoders for sparse data", WWW 2019);
- item-KNN: cosine item-item similarity with a shrink term, top-k neighbours per item
  (Sarwar et al., WWW 2001; the shrunk cosine of Dacrema et al.'s ``ItemKNNCF``);
- RP3beta (Paudel et al., "Updatable, accurate, diverse, and scalable recommendations for
  interactive applications", ACM TiiS 2017): three-step random-walk probabilities raised to
  ``alpha``, divided by the target's popularity to the ``beta``, top-k per item;
- ALS (Hu, Koren and Volinsky, "Collaborative filtering for implicit feedback datasets", ICDM
  2008) from the ``implicit`` package (the ``peers`` extra), what a practitioner with a
  million-item catalog would pick instead: its memory is (users + items) x factors, so it is
  the peer :data:`SCALE_PEERS` keeps past the dense limit. :data:`PEERS` (the comparison of
  catalogs up to :data:`MAX_DENSE_ITEMS`) holds it with a grid of its own (:data:`ALS_SMALL`),
  tuned on ml-100k validation, where it is the strongest peer (above EASE on validation and
  test); without the extra it is skipped, and the report says so.
- item-KNN from a sparse table (:data:`ITEM_KNN_SPARSE`, in :data:`SCALE_PEERS`): each item's
  top-k cosine co-occurrences, built in blocks by the ranker's own
  :func:`~slimrank.ranking.neighbors.cooccurrence_table`, so it fits a million items.

The item-item models are built densely (``(I, I)`` float32), which is what a peer on a catalog
of thousands of items needs; they are measuring sticks, not served.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from slimrank.data.dataset import Split
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.evaluation.metrics import per_user_metrics, ranking_metrics
from slimrank.evaluation.paired import PerUser
from slimrank.evaluation.protocol import ScoreFn, rank_users

log = logging.getLogger(__name__)
# Peer fits that take at least this long are logged at INFO (progress on long work).
PROGRESS_AFTER_S = 5.0

PARTS = ("valid", "test")
# implicit's ALS threads (0: one per core). A 1M fit took 1.4-1.65x less wall time on both
# cores of the 2-core machine than on one; the result does not depend on it.
ALS_THREADS = 0
# Fits a peer on the observed (U, I) binary matrix with one setting of its hyperparameters.
FitFn = Callable[[sp.csr_matrix, Mapping[str, Any]], ScoreFn]


def observed_interactions(split: Split, part: str) -> sp.csr_matrix:
    """Return what every system may read when scoring ``part``, as a binary ``(U, I)`` matrix.

    ``"valid"``: the training interactions. ``"test"``: training and validation interactions.
    The same matrix is what the protocol excludes from the ranking of that part.
    """
    if part == "valid":
        return split.seen_for_valid()
    if part == "test":
        return split.seen_for_test()
    raise ValueError(f"part={part!r}: must be one of {PARTS}")


def observed_times(split: Split, part: str) -> sp.csr_matrix:
    """Return the latest timestamp of each (user, item) of :func:`observed_interactions`."""
    from slimrank.ranking.histories import latest_times

    if part not in PARTS:
        raise ValueError(f"part={part!r}: must be one of {PARTS}")
    parts = [split.train] if part == "valid" else [split.train, split.valid]
    columns = [
        np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "item", "timestamp")
    ]
    return latest_times(*columns, (split.n_users, split.n_items))


def truth_of(split: Split, part: str) -> sp.csr_matrix:
    """Return the relevant items of ``part`` (``"valid"`` or ``"test"``)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: must be one of {PARTS}")
    return split.valid_matrix() if part == "valid" else split.test_matrix()


# -- scorers ------------------------------------------------------------------------------------


def _binary(x: sp.spmatrix) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _rows_times(x: sp.csr_matrix, weights: np.ndarray | sp.spmatrix) -> ScoreFn:
    """Return a scorer: the users' observed rows times the ``(I, I)`` item-item ``weights``."""
    x = sp.csr_matrix(x, dtype=np.float32)

    def score(users: np.ndarray) -> np.ndarray:
        out = x[users] @ weights
        return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64)

    return score


def keep_top_k(weights: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Return ``weights`` with all but the ``k`` largest entries of each row (``axis=1``) or
    column (``axis=0``) set to zero; ties go to the lower index."""
    w = np.asarray(weights)
    if k <= 0:
        raise ValueError(f"k={k}: must be positive")
    if k >= w.shape[axis]:
        return w.copy()
    order = np.argsort(-w, axis=axis, kind="stable")
    keep = np.take(order, np.arange(k), axis=axis)
    out = np.zeros_like(w)
    np.put_along_axis(out, keep, np.take_along_axis(w, keep, axis=axis), axis=axis)
    return out


def fit_most_popular(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """Every user gets the items' interaction counts in ``x`` as scores."""
    popularity = np.asarray(_binary(x).sum(axis=0)).ravel()

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(popularity, (len(users), len(popularity)))

    return score


def fit_ease(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """EASE with L2 weight ``params["l2"]`` (Steck, 2019; see ``ease_weights``)."""
    x = _binary(x)
    return _rows_times(x, ease_weights(x, EaseConfig(l2=float(params["l2"]))))


def item_knn_weights(x: sp.csr_matrix, k: int, shrink: float) -> np.ndarray:
    """Return the ``(I, I)`` item-KNN weights: shrunk cosine, top ``k`` sources per target.

    ``W[i, j] = <x_i, x_j> / (|x_i| |x_j| + shrink)`` over item columns of binary ``x``, zero
    diagonal; each column ``j`` keeps its ``k`` largest entries, so a user's score of ``j`` sums
    the similarities of ``j``'s ``k`` nearest items among the user's own.
    """
    x = _binary(x)
    gram = (x.T @ x).toarray()  # (I, I)
    norm = np.sqrt(np.diag(gram))
    sim = gram / (np.outer(norm, norm) + shrink + 1e-12)
    np.fill_diagonal(sim, 0.0)
    return keep_top_k(sim, k, axis=0).astype(np.float32)


def fit_item_knn(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """Item-KNN with ``params["k"]`` neighbours and ``params["shrink"]``."""
    x = _binary(x)
    return _rows_times(x, item_knn_weights(x, int(params["k"]), float(params["shrink"])))


def fit_item_knn_sparse(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """Item-KNN from a sparse table: each item's ``params["k"]`` strongest cosine
    co-occurrences (no shrink), the table the ranker's ``cooc_*`` features read
    (:func:`~slimrank.ranking.neighbors.cooccurrence_table`); memory items x k, not items^2.

    A user's score of item ``j`` sums the similarities of ``j``'s neighbours among the user's
    items, as :func:`fit_item_knn` with ``shrink = 0`` scores them.
    """
    from slimrank.ranking.neighbors import cooccurrence_table

    x = _binary(x)
    table = cooccurrence_table(x, int(params["k"])).to_csr()  # T[j, h] = sim(h, j)
    weights = sp.csr_matrix(table.T)  # W[h, j]

    def score(users: np.ndarray) -> np.ndarray:
        return (x[users] @ weights).toarray()

    return score


def rp3beta_weights(x: sp.csr_matrix, alpha: float, beta: float, k: int) -> np.ndarray:
    """Return RP3beta's ``(I, I)`` weights (Paudel et al., 2017), top ``k`` targets per source.

    ``P_ui = x / deg(u)`` and ``P_iu = x^T / deg(i)`` are the random walk's transition
    probabilities; ``W = (P_iu^alpha @ P_ui^alpha) / deg(j)^beta`` (powers elementwise), zero
    diagonal; each row ``i`` keeps its ``k`` largest entries (as in Dacrema et al.'s code).
    """
    x = _binary(x)
    deg_u = np.asarray(x.sum(axis=1)).ravel()
    deg_i = np.asarray(x.sum(axis=0)).ravel()
    p_ui = sp.diags(np.where(deg_u > 0, 1.0 / np.maximum(deg_u, 1), 0.0) ** alpha) @ x
    p_iu = sp.diags(np.where(deg_i > 0, 1.0 / np.maximum(deg_i, 1), 0.0) ** alpha) @ x.T
    w = (p_iu @ p_ui).toarray()  # (I, I)
    w = w * np.where(deg_i > 0, np.maximum(deg_i, 1) ** -beta, 0.0)[None, :]
    np.fill_diagonal(w, 0.0)
    return keep_top_k(w, k, axis=1).astype(np.float32)


def fit_rp3beta(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """RP3beta with ``params["alpha"]``, ``params["beta"]`` and ``params["k"]``."""
    x = _binary(x)
    w = rp3beta_weights(x, float(params["alpha"]), float(params["beta"]), int(params["k"]))
    return _rows_times(x, w)


def als_model(x: sp.csr_matrix, params: Mapping[str, Any]) -> Any:
    """Return ``implicit``'s ``AlternatingLeastSquares`` fitted on binary ``x`` (confidence
    ``1 + alpha * x``).

    ``params``: ``factors``, ``regularization``, ``alpha``, ``iterations``, and optionally
    ``random_state`` (default 0), so a fit is reproducible. It runs on :data:`ALS_THREADS`
    threads: each user's (and item's) conjugate-gradient solve reads only the other side's
    factors, so the factors are the same bit for bit on any number of threads
    (``tests/test_peers_als.py``).
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit's advice: one BLAS thread (its own loop is the parallel one); it warns otherwise.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=int(params["factors"]),
            regularization=float(params["regularization"]),
            alpha=float(params["alpha"]),
            iterations=int(params["iterations"]),
            random_state=int(params.get("random_state", 0)),
            num_threads=ALS_THREADS,
        )
        model.fit(sp.csr_matrix(_binary(x), dtype=np.float32), show_progress=False)
    return model


def fit_als(x: sp.csr_matrix, params: Mapping[str, Any]) -> ScoreFn:
    """ALS (:func:`als_model`) on binary ``x``; a user's score of an item is the dot of their
    factors, as ``AlternatingLeastSquares.recommend`` ranks them."""
    model = als_model(x, params)
    users_f = np.asarray(model.user_factors, dtype=np.float32)  # (U, f)
    items_f = np.asarray(model.item_factors, dtype=np.float32)  # (I, f)

    def score(users: np.ndarray) -> np.ndarray:
        return users_f[users] @ items_f.T  # (B, I)

    return score


# -- selection on validation, test under equal information --------------------------------------


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer: its name, how to fit it, and the grid its hyperparameters are chosen from."""

    name: str
    fit: FitFn
    grid: Mapping[str, Sequence[Any]]
    # Why it is run only up to MAX_DENSE_ITEMS items (see peers_for); None: any catalog.
    small_only: str | None = "dense item-item matrices"
    # The module its fit imports from an optional extra: without it the peer is skipped.
    requires: str | None = None

    def settings(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, v, strict=True)) for v in itertools.product(*self.grid.values())]


MOST_POPULAR = Peer("most popular", fit_most_popular, {}, small_only=None)
ALS = Peer(
    "ALS (implicit)",
    fit_als,
    # At 100k users x 84k items validation preferred alpha 40, regularization 10 (NDCG@10
    # 0.082, against 0.061 for alpha 10, regularization 0.01); 128 factors did worse. The grid
    # is the four settings around that choice: one fit at 1M costs ~150-200 s of one core, and
    # nine (with 0.01 and alpha 1) did not fit make bench-scale's 90 minutes.
    {
        "factors": (64,),
        "regularization": (1.0, 10.0),
        "alpha": (10.0, 40.0),
        "iterations": (15,),
    },
    small_only=None,
    requires="implicit",
)
# ml-100k wants far more regularization per unit of alpha than the scale grid: on validation
# (fitted on train) 256 factors, regularization 20, alpha 2 score 0.2622 NDCG@10 (EASE
# 0.2596; the scale grid's best, 64 factors, regularization 10, alpha 10, 0.2056:
# bench/more_peers.py), and 512 factors no more (0.2622-0.2623, a scratch check). 27 fits
# of 0.3-0.6 s each at 100k; at 1M one takes minutes.
ALS_SMALL = Peer(
    "ALS (implicit)",
    fit_als,
    {
        "factors": (64, 128, 256),
        "regularization": (10.0, 20.0, 30.0),
        "alpha": (1.0, 2.0, 3.0),
        "iterations": (15,),
    },
    small_only="a grid of 27 fits tuned on ml-100k",
    requires="implicit",
)
ITEM_KNN_SPARSE = Peer(
    "item-KNN (sparse top-k)", fit_item_knn_sparse, {"k": (50, 100, 200)}, small_only=None
)
PEERS: tuple[Peer, ...] = (
    MOST_POPULAR,
    Peer("EASE", fit_ease, {"l2": (100.0, 250.0, 500.0, 1000.0)}),
    Peer("item-KNN", fit_item_knn, {"k": (50, 100, 200, 400), "shrink": (0.0, 10.0, 50.0, 100.0)}),
    Peer(
        "RP3beta",
        fit_rp3beta,
        {"alpha": (0.5, 0.75, 1.0), "beta": (0.4, 0.6, 0.8, 1.0), "k": (100, 200, 400)},
    ),
    ALS_SMALL,
)


# The peers that fit a catalog of a million items and users (configs/scale.toml's comparison).
SCALE_PEERS: tuple[Peer, ...] = (MOST_POPULAR, ITEM_KNN_SPARSE, ALS)

# Item-item peers hold dense (I, I) matrices: 20,000 items is 1.6 GB of float32 per matrix.
MAX_DENSE_ITEMS = 20_000


def peers_for(
    n_items: int, peers: Iterable[Peer] = PEERS, max_items: int = MAX_DENSE_ITEMS
) -> tuple[tuple[Peer, ...], tuple[str, ...]]:
    """Return ``(peers to run, each other one with why)``: a peer with ``small_only`` needs
    ``n_items <= max_items``, and one that ``requires`` a module needs it installed.

    A skipped peer reads ``"EASE (dense item-item matrices, past 20,000 items)"``.
    """
    fit, skipped = [], []
    for peer in peers:
        if peer.small_only and n_items > max_items:
            skipped.append(f"{peer.name} ({peer.small_only}, past {max_items:,} items)")
        elif peer.requires and importlib.util.find_spec(peer.requires) is None:
            skipped.append(f"{peer.name} ({peer.requires} is not installed: the peers extra)")
        else:
            fit.append(peer)
    return tuple(fit), tuple(skipped)


@dataclasses.dataclass(frozen=True)
class PeerResult:
    """A peer's selected setting, its metrics per part, per-user test NDCG and every trial."""

    name: str
    params: dict[str, Any]
    valid: dict[str, float]
    test: dict[str, float]
    test_per_user: PerUser  # NDCG@k of each test user
    trials: list[tuple[dict[str, Any], float]]  # (setting, validation NDCG@k)
    # The test refit's training time (the selected setting on train + valid): wall and CPU s.
    fit_seconds: float = 0.0
    fit_cpu_seconds: float = 0.0
    # The test ranking: the top k items of each of test_per_user.users, in that order.
    test_top: np.ndarray | None = None


def score_part(
    fit: FitFn,
    params: Mapping[str, Any],
    split: Split,
    part: str,
    k: int = 10,
    users: np.ndarray | None = None,
) -> tuple[dict[str, float], PerUser]:
    """Fit on what ``part`` may read, rank all unseen items, return metrics and per-user NDCG.

    The fit input, the ranking's user rows and the excluded items are all
    :func:`observed_interactions` of ``part``: the single place that decides it. ``users``:
    score only those of them that have ``part`` items (default: all that do).
    """
    observed = observed_interactions(split, part)
    return score_fitted(fit(observed, params), split, part, k, users)


def score_fitted(
    score_fn: ScoreFn, split: Split, part: str, k: int = 10, users: np.ndarray | None = None
) -> tuple[dict[str, float], PerUser]:
    """Return the metrics and per-user NDCG of an already fitted ``score_fn`` on ``part``."""
    metrics, per_user, _ = rank_fitted(score_fn, split, part, k, users)
    return metrics, per_user


def rank_fitted(
    score_fn: ScoreFn, split: Split, part: str, k: int = 10, users: np.ndarray | None = None
) -> tuple[dict[str, float], PerUser, np.ndarray]:
    """Return :func:`score_fitted`'s metrics and per-user NDCG and the ``(U, k)`` top items."""
    observed = observed_interactions(split, part)
    truth = truth_of(split, part)
    have = np.flatnonzero(np.diff(truth.indptr) > 0)
    users = have if users is None else np.intersect1d(have, users)
    top = rank_users(score_fn, users, observed, k)
    rows = truth[users]
    metrics = ranking_metrics(top, rows, (k,))
    metrics["users"] = float(len(users))
    return metrics, PerUser(users, per_user_metrics(top, rows, k)["ndcg"]), top


def protocol_check(
    fit: FitFn, params: Mapping[str, Any], split: Split, k: int = 10
) -> dict[str, float]:
    """Return test metrics of a peer fitted on, and reading, the training part only.

    This is RecBole's setting (its models score test users from their training rows), kept
    only to check the protocol against RecBole's published numbers (a different random split);
    it is not a comparison under equal information. Exclusions stay train + valid.
    """
    train = observed_interactions(split, "valid")
    truth = truth_of(split, "test")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    top = rank_users(fit(train, params), users, observed_interactions(split, "test"), k)
    metrics = ranking_metrics(top, truth[users], (k,))
    metrics["users"] = float(len(users))
    return metrics


def _progress_level(seconds: float) -> int:
    """INFO for a fit long enough to want progress (a 1M ALS fit), DEBUG for a quick one."""
    return logging.INFO if seconds >= PROGRESS_AFTER_S else logging.DEBUG


def evaluate_peer(
    peer: Peer, split: Split, k: int = 10, users: np.ndarray | None = None
) -> PeerResult:
    """Select ``peer``'s setting by validation NDCG@k, then refit and score the test part.

    ``users``: select and score on those users only (e.g. the sample a pipeline evaluates
    at scale); default every user with items in the part.
    """
    trials: list[tuple[dict[str, Any], float]] = []
    best: tuple[float, dict[str, Any], dict[str, float]] | None = None
    settings = peer.settings()
    for i, params in enumerate(settings, 1):
        started = time.perf_counter()
        valid, _ = score_part(peer.fit, params, split, "valid", k, users)
        value = valid[f"ndcg@{k}"]
        trials.append((params, value))
        seconds = time.perf_counter() - started
        log.log(
            _progress_level(seconds),
            "peer %s, setting %d/%d (%s): valid NDCG@%d %.4f in %.0f s",
            peer.name,
            i,
            len(settings),
            format_params(params),
            k,
            value,
            seconds,
        )
        if best is None or value > best[0]:
            best = (value, params, valid)
    assert best is not None  # settings() of an empty grid is one empty setting
    _, params, valid = best
    wall, cpu = time.perf_counter(), time.process_time()
    fitted = peer.fit(observed_interactions(split, "test"), params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    test, per_user, top = rank_fitted(fitted, split, "test", k, users)
    log.log(
        _progress_level(wall),
        "peer %s: refit on train + valid in %.0f s, test NDCG@%d %.4f",
        peer.name,
        wall,
        k,
        test[f"ndcg@{k}"],
    )
    return PeerResult(peer.name, params, valid, test, per_user, trials, wall, cpu, top)


def evaluate_peers(
    split: Split, k: int = 10, peers: Iterable[Peer] = PEERS, users: np.ndarray | None = None
) -> dict[str, PeerResult]:
    """Return :func:`evaluate_peer` of every peer, by name.

    ``ValueError`` before any fit if two peers share a name (``ALS`` and ``ALS_SMALL`` do:
    one grid each for the scale and the ml-100k comparisons), since one row would replace
    the other.
    """
    peers = tuple(peers)
    names = [peer.name for peer in peers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"evaluate_peers: peer names must differ, repeated: {repeated}")
    return {peer.name: evaluate_peer(peer, split, k, users) for peer in peers}


def format_params(params: Mapping[str, Any]) -> str:
    """Return ``"l2=500"``-style text of a setting (``"-"`` when there is none)."""
    return ", ".join(f"{key}={value:g}" for key, value in params.items()) or "-"
