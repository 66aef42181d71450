"""A BM25 text index over items, with prefix matching and typo tolerance at query time.

The index is a ``(terms, items)`` CSR matrix of BM25 term weights (Lucene's variant:
``idf(t) * tf / (tf + k1 * (1 - b + b * len / avg_len))`` with
``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``), built offline by bm25s
(:func:`build_text_index`) and stored as safetensors + JSON (:mod:`slimrank.search.text_io`).
A query's score for an item is the sum over the query's tokens of the best weight among the
token's expansions:

- a token in the vocabulary matches itself;
- the last token of a query typed so far (no trailing space) also matches every vocabulary
  term it begins (``"godf"`` -> ``"godfather"``), at most ``max_expansions`` of them, the
  most frequent first;
- a token that matches nothing that way matches the vocabulary terms at the smallest edit
  distance (optimal string alignment: a swap of two neighbours is one edit), within
  ``max_edits(token)`` edits, each weighted ``1 - typo_penalty * distance``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from slimrank.search.tokens import ends_in_word, tokenize


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """How query tokens expand to vocabulary terms."""

    max_tokens: int = 32  # tokens past these are ignored
    max_expansions: int = 64  # vocabulary terms a prefix expands to (most frequent first)
    min_prefix: int = 1  # shorter last tokens are not expanded as prefixes
    typo_penalty: float = 0.2  # weight lost per edit of a typo-corrected term
    min_typo_length: int = 3  # shorter tokens must match exactly (or as a prefix)
    long_token: int = 8  # tokens this long may have two edits, shorter ones one

    def max_edits(self, token: str) -> int:
        """Return the edits a token may differ by from a vocabulary term."""
        if len(token) < self.min_typo_length:
            return 0
        return 2 if len(token) >= self.long_token else 1


@dataclasses.dataclass(frozen=True)
class Expansion:
    """The vocabulary terms one query token matches, with their weights."""

    token: str
    terms: np.ndarray  # (e,) int64 term ids
    weights: np.ndarray  # (e,) float32 in (0, 1]
    kind: str  # "exact", "prefix", "typo" or "none"


@dataclasses.dataclass(frozen=True, eq=False)
class TextIndex:
    """BM25 weights of every vocabulary term in every item; never mutated once built."""

    vocab: tuple[str, ...]  # sorted, distinct
    weights: sp.csr_matrix  # (terms, items) float32 BM25 weights
    k1: float = 1.5
    b: float = 0.75
    config: MatchConfig = dataclasses.field(default_factory=MatchConfig)
    _term_id: dict[str, int] = dataclasses.field(init=False, repr=False)
    _sorted: np.ndarray = dataclasses.field(init=False, repr=False)
    _df: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if list(self.vocab) != sorted(set(self.vocab)):
            raise ValueError("TextIndex.vocab must be sorted and distinct")
        if self.weights.shape[0] != len(self.vocab):
            raise ValueError(
                f"TextIndex: {self.weights.shape[0]} weight rows for {len(self.vocab)} terms"
            )
        weights = sp.csr_matrix(self.weights, dtype=np.float32)
        weights.sort_indices()
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "_term_id", {t: i for i, t in enumerate(self.vocab)})
        object.__setattr__(self, "_sorted", np.asarray(self.vocab, dtype=str))
        object.__setattr__(self, "_df", np.diff(weights.indptr))

    @property
    def n_items(self) -> int:
        """Items the index covers (columns of the weights)."""
        return int(self.weights.shape[1])

    def document_frequency(self, term: str) -> int:
        """Return how many items contain ``term`` (0 if it is not in the vocabulary)."""
        i = self._term_id.get(term)
        return 0 if i is None else int(self._df[i])

    def _prefix_terms(self, token: str) -> np.ndarray:
        lo = int(np.searchsorted(self._sorted, token, side="left"))
        hi = int(np.searchsorted(self._sorted, token + "\U0010ffff", side="left"))
        ids = np.arange(lo, hi, dtype=np.int64)
        if ids.size > self.config.max_expansions:
            order = np.argsort(-self._df[ids], kind="stable")[: self.config.max_expansions]
            ids = np.sort(ids[order])
        return ids

    def _typo_terms(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        from rapidfuzz import process
        from rapidfuzz.distance import OSA

        edits = self.config.max_edits(token)
        if edits == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        hits = process.extract(
            token, self.vocab, scorer=OSA.distance, score_cutoff=edits, limit=None
        )
        if not hits:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        best = min(distance for _, distance, _ in hits)
        ids = np.asarray(sorted(i for _, d, i in hits if d == best), dtype=np.int64)
        weight = max(1.0 - self.config.typo_penalty * best, 0.0)
        return ids, np.full(ids.size, weight, dtype=np.float32)

    def expand(self, token: str, as_prefix: bool) -> Expansion:
        """Return the terms ``token`` matches (see the module docstring)."""
        exact = self._term_id.get(token)
        if as_prefix and len(token) >= self.config.min_prefix:
            ids = self._prefix_terms(token)
            if ids.size:
                return Expansion(token, ids, np.ones(ids.size, dtype=np.float32), "prefix")
        if exact is not None:
            return Expansion(
                token, np.asarray([exact], dtype=np.int64), np.ones(1, np.float32), "exact"
            )
        ids, weights = self._typo_terms(token)
        return Expansion(token, ids, weights, "typo" if ids.size else "none")

    def expansions(self, text: str) -> list[Expansion]:
        """Return the expansion of each of the query's first ``max_tokens`` tokens."""
        tokens = tokenize(text)[: self.config.max_tokens]
        typing = ends_in_word(text)
        return [
            self.expand(token, as_prefix=typing and i == len(tokens) - 1)
            for i, token in enumerate(tokens)
        ]

    def score(self, text: str) -> np.ndarray:
        """Return ``(items,)`` float32 BM25 scores of ``text``: 0 for items it does not match."""
        return self.match(text)[0]

    def match(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(items,)`` float32 BM25 scores and ``(items,)`` int32 tokens matched."""
        out = np.zeros(self.n_items, dtype=np.float32)
        matched = np.zeros(self.n_items, dtype=np.int32)
        for expansion in self.expansions(text):
            if not expansion.terms.size:
                continue
            rows = self.weights[expansion.terms]  # (e, items)
            if expansion.terms.size == 1:
                out[rows.indices] += rows.data * expansion.weights[0]
                matched[rows.indices] += 1
                continue
            scaled = sp.csr_matrix(sp.diags(expansion.weights) @ rows)
            best = scaled.max(axis=0).toarray().ravel()  # (items,)
            out += best
            matched += best > 0
        return out, matched


def bm25_weights(
    documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75
) -> tuple[tuple[str, ...], sp.csr_matrix]:
    """Return the sorted vocabulary and ``(terms, items)`` Lucene BM25 weights, via bm25s."""
    import bm25s

    vocab = tuple(sorted({token for doc in documents for token in doc}))
    if not vocab:
        return vocab, sp.csr_matrix((0, len(documents)), dtype=np.float32)
    term_id = {t: i for i, t in enumerate(vocab)}
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(
        bm25s.tokenization.Tokenized(
            ids=[[term_id[t] for t in doc] for doc in documents], vocab=term_id
        ),
        show_progress=False,
    )
    scores = retriever.scores  # CSC (items, terms): column j is our term j
    matrix = sp.csc_matrix(
        (scores["data"], scores["indices"], scores["indptr"]),
        shape=(len(documents), len(scores["indptr"]) - 1),
    )
    return vocab, sp.csr_matrix(matrix[:, : len(vocab)].T, dtype=np.float32)


def build_text_index(
    documents: Sequence[str],
    k1: float = 1.5,
    b: float = 0.75,
    config: MatchConfig | None = None,
) -> TextIndex:
    """Return the index of one text per item (fields already joined with spaces)."""
    vocab, weights = bm25_weights([tokenize(doc) for doc in documents], k1, b)
    return TextIndex(vocab, weights, k1, b, config or MatchConfig())
