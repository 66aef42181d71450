"""The text search stage: match the query's words, filter, then order for the user.

``search_text`` runs after the user is resolved (:meth:`ModelSnapshot.user_query`):

1. **match**: the catalog's BM25 index scores every item for the text (prefix and typo
   expansion, :mod:`slimrank.search.text_index`); an item's text score is the number of
   the query's words it matches plus its BM25 score / (the best BM25 score + 1), so items
   matching more words come first; items matching none are out;
2. **filter**: items outside the request's filters or dropped are removed, before anything is
   cut, so ``k`` items come back whenever ``k`` match;
3. **candidates**: the ``candidates`` best text matches (ties: the more popular first);
4. **order**: ``text / max(text)`` plus
   - with a user: ``ranker_weight`` x the served ranker's scores of the candidates, z-scored
     within the request (the ranker reads the same features as in Recommend, with the user's
     inner product with each item as the retrieval score);
   - without one: ``popularity_weight`` x ``log1p(popularity) / log1p(max popularity)``.

The text score is scaled to [0, 1] and the ranker's scores to z-scores because the two live
on unrelated scales (BM25 grows with query length, ranker logits are unbounded): a linear
blend of normalized scores keeps the text match decisive where it separates items (a title's
words) and lets the ranker decide among near-equal matches (every comedy for "comedy"). The
weights were chosen on one half of ml-100k's test users and evaluated on the other
(``bench/text_search.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slimrank.serving.snapshot import ModelSnapshot, Retrieved, UserQuery


@dataclasses.dataclass(frozen=True)
class TextSearchConfig:
    """How many text matches are ranked, and how ranker or popularity join the text score."""

    candidates: int = 200
    ranker_weight: float = 0.5
    popularity_weight: float = 1.0  # both chosen by bench/text_search.py on ml-100k


@dataclasses.dataclass(frozen=True)
class TextHits:
    """A text query's candidates (best text match first) and their scores."""

    rows: np.ndarray  # (m,) int64
    text: np.ndarray  # (m,) float32 text scores: words matched + BM25 / (max BM25 + 1), > 0

    def __len__(self) -> int:
        return len(self.rows)


def text_candidates(
    snapshot: ModelSnapshot,
    text: str,
    n: int,
    allowed: np.ndarray | None = None,
    drop: np.ndarray | None = None,
) -> TextHits:
    """Return up to ``n`` items matching ``text`` within ``allowed`` minus ``drop`` rows."""
    if snapshot.catalog is None:
        raise ValueError(f"model {snapshot.version} has no search catalog")
    bm25, matched = snapshot.catalog.text.match(text)  # (items,) each
    # More of the query's words first, then BM25: "star wa" puts Star Wars and Star Trek
    # above titles matching only "wa*", however rare (and so heavy) those terms are.
    scores = matched + bm25 / (float(bm25.max()) + 1.0)
    keep = matched > 0
    if allowed is not None:
        keep &= allowed
    if drop is not None and drop.size:
        keep[drop] = False
    rows = np.flatnonzero(keep)
    order = np.lexsort((-snapshot.popularity[rows], -scores[rows]))[:n]
    rows = rows[order].astype(np.int64)
    return TextHits(rows, scores[rows].astype(np.float32))


def fuse(
    text: np.ndarray,
    ranker: np.ndarray | None,
    popularity: np.ndarray,
    max_popularity: float,
    config: TextSearchConfig,
) -> np.ndarray:
    """Return ``(m,)`` float32 final scores of candidates (see the module docstring)."""
    if not text.size:
        return text.astype(np.float32)
    base = text / text.max()
    if ranker is None:
        scale = np.log1p(max_popularity) or 1.0
        return (base + config.popularity_weight * np.log1p(popularity) / scale).astype(np.float32)
    std = ranker.std()
    z = (ranker - ranker.mean()) / std if std > 0 else np.zeros_like(ranker)
    return (base + config.ranker_weight * z).astype(np.float32)


def search_text(
    snapshot: ModelSnapshot,
    query: UserQuery,
    text: str,
    k: int,
    config: TextSearchConfig,
    allowed: np.ndarray | None = None,
    drop: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the ``k`` best ``(rows, scores)`` for ``text`` and the candidate count."""
    hits = text_candidates(snapshot, text, max(config.candidates, k), allowed, drop)
    ranker = None
    if query.vector is not None and len(hits):
        retrieval = (snapshot.item_vectors[hits.rows] @ query.vector).astype(np.float32)
        features = snapshot.featurize(query, Retrieved(hits.rows, retrieval))  # (m, F)
        ranker = np.asarray(snapshot.score(features), dtype=np.float32).reshape(-1)
    popularity = snapshot.popularity[hits.rows]
    scores = fuse(hits.text, ranker, popularity, float(snapshot.popularity.max()), config)
    order = np.argsort(-scores, kind="stable")[:k]
    return hits.rows[order], scores[order], len(hits)


def retrieve_allowed(
    snapshot: ModelSnapshot, query: UserQuery, n: int, drop: np.ndarray, allowed: np.ndarray
) -> Retrieved:
    """Return up to ``n`` candidates among ``allowed`` rows minus ``drop``, best first.

    The retrieval stage of a filtered Recommend: an exact inner product over the allowed items
    (the approximate index may not reach ``n`` of them when the filter is narrow), or, for
    the popularity fallback, the most popular allowed items (:meth:`ModelSnapshot.exact_best`).
    """
    keep = allowed.copy()
    if drop.size:
        keep[drop] = False
    rows, scores = snapshot.exact_best(query.vector, keep, n)
    return Retrieved(rows, scores)
