"""The BM25 text index against a brute-force Lucene BM25, and its prefix and typo expansion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimrank.search.text_index import MatchConfig, build_text_index
from slimrank.search.tokens import ends_in_word, tokenize

DOCS = [
    "Star Wars (1977) Action Adventure",
    "Star Trek: First Contact (1996) Action Sci-Fi",
    "Godfather, The (1972) Crime Drama",
    "Godfather: Part II, The (1974) Crime Drama",
    "Stargate (1994) Action Sci-Fi",
    "Amélie (2001) Comedy Romance",
    "Lone Star (1996) Drama Mystery",
]


def brute_bm25(docs: list[str], term: str, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Lucene's BM25 weight of ``term`` in each document, straight from the formula."""
    tokens = [tokenize(d) for d in docs]
    n = len(docs)
    avg = sum(len(t) for t in tokens) / n
    df = sum(term in t for t in tokens)
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    out = []
    for t in tokens:
        tf = t.count(term)
        out.append(idf * tf / (tf + k1 * (1 - b + b * len(t) / avg)))
    return np.asarray(out)


def test_tokens_fold_case_and_accents_and_split_on_punctuation() -> None:
    assert tokenize("Amélie, The (2001) Sci-Fi") == ["amelie", "the", "2001", "sci", "fi"]
    assert ends_in_word("star wa") and not ends_in_word("star ") and not ends_in_word("")


def test_every_weight_equals_the_lucene_formula() -> None:
    index = build_text_index(DOCS)
    assert index.vocab == tuple(sorted({t for d in DOCS for t in tokenize(d)}))
    dense = index.weights.toarray()  # (terms, items)
    for i, term in enumerate(index.vocab):
        np.testing.assert_allclose(dense[i], brute_bm25(DOCS, term), rtol=1e-5, atol=1e-7)


def test_a_finished_query_scores_the_sum_of_its_terms() -> None:
    index = build_text_index(DOCS)
    expected = brute_bm25(DOCS, "star") + brute_bm25(DOCS, "drama")
    np.testing.assert_allclose(index.score("Star DRAMA "), expected, rtol=1e-5)
    _, matched = index.match("star drama ")
    np.testing.assert_array_equal(matched, [1, 1, 1, 1, 0, 0, 2])


def test_the_last_word_being_typed_matches_as_a_prefix() -> None:
    index = build_text_index(DOCS)
    # "star" as typed also matches "stargate": the better of the two weights per item.
    expected = np.maximum(brute_bm25(DOCS, "star"), brute_bm25(DOCS, "stargate"))
    np.testing.assert_allclose(index.score("star"), expected, rtol=1e-5)
    np.testing.assert_allclose(index.score("star "), brute_bm25(DOCS, "star"), rtol=1e-5)
    np.testing.assert_allclose(index.score("godf"), brute_bm25(DOCS, "godfather"), rtol=1e-5)
    assert index.score("godf ").max() == 0  # a finished word is not a prefix (and too far)


def test_a_typo_matches_the_nearest_terms_at_a_penalty() -> None:
    index = build_text_index(DOCS, config=MatchConfig(typo_penalty=0.2))
    [expansion] = index.expansions("godfater ")  # one deletion
    assert expansion.kind == "typo" and [index.vocab[t] for t in expansion.terms] == ["godfather"]
    np.testing.assert_allclose(
        index.score("godfater "), 0.8 * brute_bm25(DOCS, "godfather"), rtol=1e-5
    )
    # A swap of two neighbours is one edit: "dramaa" and "darma" both find "drama".
    np.testing.assert_allclose(index.score("darma "), 0.8 * brute_bm25(DOCS, "drama"), rtol=1e-5)
    assert index.expansions("amelei ")[0].kind == "typo"
    assert index.expansions("xyz ")[0].kind == "none"  # too short for a typo, no term


def test_queries_that_match_nothing_score_zero() -> None:
    index = build_text_index(DOCS)
    for text in ("", "   ", "!!!", "qqqqqqqqqqqq", "zzzz zzzz"):
        assert not index.score(text).any()


def test_prefix_expansion_keeps_the_most_frequent_terms() -> None:
    docs = ["aa", "ab", "ab", "ac", "ac", "ac"]
    index = build_text_index(docs, config=MatchConfig(max_expansions=2))
    [expansion] = index.expansions("a")
    assert [index.vocab[t] for t in expansion.terms] == ["ab", "ac"]


def test_a_long_query_reads_at_most_max_tokens_words() -> None:
    index = build_text_index(DOCS, config=MatchConfig(max_tokens=2))
    assert len(index.expansions("star wars godfather drama")) == 2


@pytest.mark.parametrize("vocab", [("b", "a"), ("a", "a")])
def test_an_unsorted_or_repeating_vocabulary_is_refused(vocab: tuple[str, ...]) -> None:
    import scipy.sparse as sp

    from slimrank.search.text_index import TextIndex

    with pytest.raises(ValueError, match="sorted and distinct"):
        TextIndex(vocab, sp.csr_matrix((2, 3), dtype=np.float32))


def test_typo_edit_budget_and_penalty_follow_the_token_length() -> None:
    """3-letter tokens get one edit, 8-letter tokens two, each edit costing typo_penalty."""
    index = build_text_index(DOCS, config=MatchConfig(typo_penalty=0.2))
    [short] = index.expansions("scx ")  # 3 letters, one substitution from "sci"
    assert short.kind == "typo" and [index.vocab[t] for t in short.terms] == ["sci"]
    [long] = index.expansions("satrgaet ")  # 8 letters, two swaps from "stargate"
    assert long.kind == "typo" and [index.vocab[t] for t in long.terms] == ["stargate"]
    np.testing.assert_allclose(
        index.score("satrgaet "), 0.6 * brute_bm25(DOCS, "stargate"), rtol=1e-5
    )
    assert index.expansions("sx ")[0].kind == "none"  # 2 letters: exact or prefix only


def test_a_typo_matches_only_the_terms_at_the_smallest_distance() -> None:
    """Of two terms within the edit budget, only the nearer one is matched."""
    index = build_text_index(["abcdefgh", "abcdefxy"])
    [expansion] = index.expansions("abcdefgx ")  # 1 edit from abcdefgh, 2 from abcdefxy
    assert [index.vocab[t] for t in expansion.terms] == ["abcdefgh"]


def test_a_prefix_counts_as_one_matched_word_only_where_it_matches() -> None:
    """A prefix expanding to several terms adds one matched word to the items holding any."""
    index = build_text_index(DOCS)
    _, matched = index.match("sta")  # star and stargate
    want = [int(any(t.startswith("sta") for t in tokenize(d))) for d in DOCS]
    np.testing.assert_array_equal(matched, want)
    _, matched = index.match("drama sta")
    np.testing.assert_array_equal(
        matched, np.asarray(want) + ["drama" in tokenize(d) for d in DOCS]
    )
