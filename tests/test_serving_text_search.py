"""Text search and filters through the real server and client, on the tiny pipeline bundle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from served_store import serving
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.cli import main
from slimrank.search.filters import ItemFilter
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import recommender_pb2, recommender_pb2_grpc
from slimrank.serving.reload import bundle_reload_fn, load_current
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import ModelSnapshot, Retrieved, SnapshotHolder
from slimrank.serving.status import field_violations
from slimrank.serving.text_search import TextSearchConfig

ALL_WORDS = "red blue night river star garden winter city"  # every synthetic title has two


@dataclasses.dataclass(frozen=True)
class Served:
    run: TinyRun
    snapshot: ModelSnapshot
    client: SlimrankClient
    stub: recommender_pb2_grpc.RecommenderStub


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run = tiny_pipeline(tmp_path_factory)
    with serving(run.bundles) as (holder, port, client):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            yield Served(run, holder.get(), client, stub)
        finally:
            channel.close()


@pytest.fixture
def start_admin() -> Iterator[Callable[[Path], SlimrankClient]]:
    """Serve a bundles root with reloads allowed (no admin token); stopped after the test."""
    servers = []

    def _start(root: Path) -> SlimrankClient:
        holder = SnapshotHolder(load_current(root))
        server, port = create_server(
            ServerConfig(), holder, CollectorRegistry(), bundle_reload_fn(root)
        )
        server.mark_serving()
        client = SlimrankClient(f"127.0.0.1:{port}", timeout=10.0)
        servers.append((server, client))
        return client

    yield _start
    for server, client in servers:
        client.close()
        server.shutdown(0).wait(5)


def reference(
    snap: ModelSnapshot,
    text: str,
    k: int,
    user: str = "",
    allowed: np.ndarray | None = None,
    exclude: tuple[str, ...] = (),
    recent: tuple[str, ...] = (),
) -> list[str]:
    """The documented ordering, written out in numpy over the catalog's BM25 match."""
    cfg = TextSearchConfig()
    assert snap.catalog is not None
    bm25, matched = snap.catalog.text.match(text)
    text_score = matched + bm25 / (bm25.max() + 1.0)
    keep = matched > 0
    if allowed is not None:
        keep &= allowed
    for item in exclude:
        keep[snap.item_row[item]] = False
    rows = [int(r) for r in np.flatnonzero(keep)]
    rows.sort(key=lambda r: (-text_score[r], -snap.popularity[r]))  # candidates, best first
    rows = np.asarray(rows[: cfg.candidates], dtype=np.int64)
    if not rows.size:
        return []
    base = text_score[rows] / text_score[rows].max()
    if user or recent:
        query = snap.user_query(user, list(recent))
        dots = snap.item_vectors[rows] @ query.vector
        ranker = np.asarray(snap.score(snap.featurize(query, Retrieved(rows, dots)))).ravel()
        final = base + cfg.ranker_weight * (ranker - ranker.mean()) / ranker.std()
    else:
        pop = np.log1p(snap.popularity[rows]) / np.log1p(snap.popularity.max())
        final = base + cfg.popularity_weight * pop
    order = np.argsort(-final, kind="stable")[:k]
    return [str(snap.item_ids[r]) for r in rows[order]]


def genre_mask(snap: ModelSnapshot, label: str) -> np.ndarray:
    assert snap.catalog is not None
    codes, vocab = snap.catalog.attributes.categorical["genre"]
    return codes == vocab.index(label)


@pytest.mark.parametrize("text", ["star", "star riv", "winetr ", "garden city", "night 1"])
def test_search_without_a_user_orders_matches_by_text_and_popularity(
    served: Served, text: str
) -> None:
    got = served.client.search_text(text, 10)
    assert got.user_source == "POPULAR"
    assert list(got.item_ids) == reference(served.snapshot, text, 10)
    assert got.item_ids  # each of these queries matches something


@pytest.mark.parametrize("text", ["star", "river garden", "winetr "])
def test_search_for_a_user_fuses_the_served_rankers_scores(served: Served, text: str) -> None:
    user = str(served.snapshot.user_ids[3])
    got = served.client.search_text(text, 8, user_id=user)
    assert got.user_source == "KNOWN"
    assert list(got.item_ids) == reference(served.snapshot, text, 8, user=user)
    assert got.item_ids != served.client.search_text(text, 8).item_ids  # the user matters


def test_titles_match_with_a_typo_and_as_a_prefix(served: Served) -> None:
    titles = served.snapshot.catalog.titles  # type: ignore[union-attr]
    for text, word in (("gardne ", "garden"), ("wint", "winter"), ("rivr ", "river")):
        got = served.client.search_text(text, 100)
        expected = {str(served.snapshot.item_ids[i]) for i, t in enumerate(titles) if word in t}
        assert set(got.item_ids) == expected


def test_filters_apply_before_ranking_so_k_items_come_back(served: Served) -> None:
    snap = served.snapshot
    allowed = genre_mask(snap, "g2")
    k = int(allowed.sum()) - 1  # every g2 item matches ALL_WORDS: k of them must come back
    f = [ItemFilter("genre", ("g2",))]
    got = served.client.search_text(ALL_WORDS, k, user_id="u3", filters=f)
    assert len(got.item_ids) == k
    assert all(allowed[snap.item_row[i]] for i in got.item_ids)
    assert list(got.item_ids) == reference(snap, ALL_WORDS, k, user="u3", allowed=allowed)


def test_recommend_with_filters_returns_k_allowed_unseen_items(served: Served) -> None:
    snap = served.snapshot
    allowed = genre_mask(snap, "g0")
    user = str(snap.user_ids[5])
    seen = set(snap.seen_rows(5).tolist())
    eligible = [r for r in np.flatnonzero(allowed) if r not in seen]
    k = min(10, len(eligible))
    got = served.client.recommend(user, k, filters=[ItemFilter("genre", ("g0",))])
    rows = [snap.item_row[i] for i in got.item_ids]
    assert len(rows) == k and all(allowed[r] and r not in seen for r in rows)
    unfiltered = served.client.recommend(user, 10)
    assert not all(allowed[snap.item_row[i]] for i in unfiltered.item_ids)


def test_search_excludes_items_and_an_unmatched_query_answers_nothing(served: Served) -> None:
    first = served.client.search_text("star", 5)
    got = served.client.search_text("star", 5, exclude=first.item_ids[:2])
    assert list(got.item_ids) == reference(served.snapshot, "star", 5, exclude=first.item_ids[:2])
    nothing = served.client.search_text("qqqqqqqqqqqq zzzzzzzzzz", 5)
    assert nothing.item_ids == () and nothing.candidates == 0


def _search(served: Served, **fields: object) -> grpc.RpcError:
    request = recommender_pb2.SearchRequest(k=fields.pop("k", 5), **fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        served.stub.Search(request, timeout=10)
    return info.value


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "text: empty"),
        ({"text": "   "}, "text: must not be empty"),
        ({"text": "x" * 10_000}, "text: longer than 512 characters (10000)"),
        ({"text": "star\x07wars"}, "text: control character U+0007 at position 4"),
        ({"text": "star\u200ewars"}, "text: format character U+200E at position 4"),
        ({"text": "star\u202ewars"}, "text: format character U+202E at position 4"),
        ({"text": "star", "query_vector": [0.0] * 3}, "text: send text or query_vector"),
        ({"text": "star", "k": 0}, "k: must be in"),
        (
            {"text": "star", "filters": [recommender_pb2.ItemFilter(field="colour", any_of=["x"])]},
            "filters[0].field: unknown item attribute 'colour' (have genre)",
        ),
        (
            {"text": "star", "filters": [recommender_pb2.ItemFilter(field="genre", any_of=["g9"])]},
            "filters[0].any_of[0]: 'g9' is not a value of 'genre'",
        ),
        (
            {"text": "star", "filters": [recommender_pb2.ItemFilter(field="", any_of=["g1"])]},
            "filters[0].field: must name an item attribute",
        ),
    ],
)
def test_bad_text_searches_are_invalid_argument_naming_the_field(
    served: Served, fields: dict[str, object], message: str
) -> None:
    error = _search(served, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_recommend_with_an_unknown_filter_value_is_invalid_argument(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as info:
        served.client.recommend("u3", 5, filters=[ItemFilter("genre", ("Comedy",))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filters[0].any_of[0]: 'Comedy' is not a value of 'genre'" in info.value.details()


def test_query_search_prints_the_matching_titles(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = served.client.search_text("winter", 5, user_id="u3")
    args = ["--target", served.client.target, "--search", "winter", "--user", "u3", "-k", "5"]
    assert main(["query", *args, "--bundles", str(served.run.bundles)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    titles = served.snapshot.catalog.titles  # type: ignore[union-attr]
    assert [r[2].strip() for r in rows] == list(expected.item_ids)
    assert [r[3].strip() for r in rows] == [
        titles[served.snapshot.item_row[i]] for i in expected.item_ids
    ]
    assert all("winter" in r[3] for r in rows)
    assert "search 'winter' for user u3 (known)" in out


def test_a_vector_search_takes_filters_too(served: Served) -> None:
    snap = served.snapshot
    allowed = genre_mask(snap, "g3")
    vector = snap.item_vectors[int(np.flatnonzero(~allowed)[0])]  # nearest items are not g3
    request = recommender_pb2.SearchRequest(
        query_vector=vector.tolist(),
        k=int(allowed.sum()),
        filters=[recommender_pb2.ItemFilter(field="genre", any_of=["g3"])],
    )
    got = served.stub.Search(request, timeout=10)
    rows = [snap.item_row[i.item_id] for i in got.items]
    assert sorted(rows) == sorted(np.flatnonzero(allowed).tolist())  # all of them, only them
    error = _search(served, query_vector=vector.tolist(), user_id="u3")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "user_id: ranks a text search only, not a query_vector"
    assert set(field_violations(error)) == {"user_id"}
    error = _search(served, query_vector=vector.tolist(), recent_item_ids=["i1"])
    assert error.details() == "recent_item_ids: ranks a text search only, not a query_vector"


def test_a_reload_swaps_the_catalog_with_the_model(
    served: Served, tmp_path: Path, start_admin: Callable[[Path], SlimrankClient]
) -> None:
    """A bundle whose catalog has new titles: after Admin.Reload, search finds them."""
    import shutil

    from slimrank.bundle import open_bundle, publish
    from slimrank.bundle.manifest import MANIFEST
    from slimrank.search.catalog import Catalog, load_catalog_dir, save_catalog
    from slimrank.search.text_index import build_text_index

    root = tmp_path / "bundles"
    shutil.copytree(served.run.bundles, root)
    client = start_admin(root)
    assert client.search_text("zeppelin", 5).item_ids == ()
    old = open_bundle(root)
    catalog = load_catalog_dir(old.path / "catalog")
    titles = catalog.titles.copy()
    titles[7] = "Zeppelin Voyage"
    new_catalog = Catalog(build_text_index(titles), catalog.attributes, titles, ("title",))

    def write(out: Path) -> None:
        for path in old.path.rglob("*"):
            rel = path.relative_to(old.path)
            if path.is_file() and rel.parts[0] != "catalog" and rel.name != MANIFEST:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out / rel)
        save_catalog(out / "catalog", new_catalog)

    version = publish(root, write, config=old.manifest.config)
    assert client.reload(version).reloaded
    got = client.search_text("zeppelin", 5)
    assert got.model_version == version
    assert got.item_ids == (str(served.snapshot.item_ids[7]),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("genre=Comedy|Drama", ItemFilter("genre", ("Comedy", "Drama"))),
        ("release_year=1990..1999", ItemFilter("release_year", low=1990.0, high=1999.0)),
        ("release_year=..1980", ItemFilter("release_year", high=1980.0)),
        ("release_year=1990..", ItemFilter("release_year", low=1990.0)),
        ("genre=|Comedy||Drama|", ItemFilter("genre", ("Comedy", "Drama"))),
    ],
)
def test_query_filters_parse(text: str, expected: ItemFilter) -> None:
    from slimrank.serving.query import parse_filter

    assert parse_filter(text) == expected


@pytest.mark.parametrize("text", ["genre", "=Comedy", "genre=", "release_year=a..b"])
def test_a_bad_query_filter_stops_naming_it(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["query", "--search", "x", "--filter", text])
    assert info.value.code == 2
    assert f"--filter {text!r}" in capsys.readouterr().err


def test_search_for_a_user_known_by_recent_items(served: Served) -> None:
    recent = tuple(str(i) for i in served.snapshot.item_ids[[4, 9, 17]])
    got = served.client.search_text("star", 6, user_id="someone-new", recent=recent)
    assert got.user_source == "RECENT"
    assert list(got.item_ids) == reference(served.snapshot, "star", 6, recent=recent)


def test_the_stages_filter_before_they_cut_to_n(served: Served) -> None:
    """With fewer candidates than matches, a filter still leaves n allowed items (brute force)."""
    from slimrank.serving.text_search import retrieve_allowed, text_candidates

    snap = served.snapshot
    allowed = genre_mask(snap, "g1")
    hits = text_candidates(snap, ALL_WORDS, 3, allowed)
    bm25, matched = snap.catalog.text.match(ALL_WORDS)  # type: ignore[union-attr]
    score = matched + bm25 / (bm25.max() + 1.0)
    rows = sorted(np.flatnonzero(allowed), key=lambda r: (-score[r], -snap.popularity[r]))
    assert hits.rows.tolist() == rows[:3]
    query = snap.user_query(str(snap.user_ids[2]), [])
    drop = snap.seen_rows(2)
    before = allowed.copy()
    got = retrieve_allowed(snap, query, 4, drop, allowed)
    np.testing.assert_array_equal(allowed, before)  # the caller's mask is not changed
    eligible = [r for r in np.flatnonzero(allowed) if r not in set(drop.tolist())]
    dots = snap.item_vectors[eligible] @ query.vector
    assert got.rows.tolist() == [eligible[i] for i in np.argsort(-dots, kind="stable")[:4]]
    np.testing.assert_allclose(got.scores, np.sort(dots)[::-1][:4], rtol=1e-6)


def test_k_above_the_candidate_count_still_returns_k_matches(served: Served) -> None:
    """The candidate cut is max(candidates, k): k items come back whenever k match."""
    from slimrank.serving.text_search import search_text

    snap = served.snapshot
    query = snap.user_query("", [])
    rows, _, count = search_text(snap, query, ALL_WORDS, 5, TextSearchConfig(candidates=3))
    bm25, matched = snap.catalog.text.match(ALL_WORDS)  # type: ignore[union-attr]
    score = matched + bm25 / (bm25.max() + 1.0)
    best = sorted(np.flatnonzero(matched), key=lambda r: (-score[r], -snap.popularity[r]))
    assert count == 5 and sorted(rows.tolist()) == sorted(best[:5])


def test_text_checks_allow_whitespace_controls_and_exactly_the_maximum_length() -> None:
    """Tabs and line breaks are spaces; 512 characters pass, 513 do not."""
    from slimrank.serving.text_validation import MAX_TEXT_LENGTH, check_text
    from slimrank.serving.validation import ValidationError

    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # a word spelled with a ZWNJ
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # an emoji joined with ZWJs
    for text in ("star\twars", "star\r\nwars", "x" * MAX_TEXT_LENGTH, persian, family):
        assert check_text(text) == text
    with pytest.raises(ValidationError, match="longer than 512 characters \\(513\\)"):
        check_text("x" * (MAX_TEXT_LENGTH + 1))


def test_filter_messages_convert_each_bound_alone_and_are_capped() -> None:
    """A max-only or min-only message keeps just that bound; at most MAX_FILTERS filters."""
    from slimrank.serving.text_validation import MAX_FILTERS, filters_from_proto
    from slimrank.serving.validation import ValidationError

    pb = recommender_pb2.ItemFilter
    got = filters_from_proto(
        [pb(field="year", max=1980), pb(field="year", min=-5), pb(field="g", any_of=["a", "b"])]
    )
    assert got == (
        ItemFilter("year", high=1980.0),
        ItemFilter("year", low=-5.0),
        ItemFilter("g", ("a", "b")),
    )
    assert len(filters_from_proto([pb(field="g", any_of=["a"])] * MAX_FILTERS)) == MAX_FILTERS
    with pytest.raises(ValidationError, match="at most 16 allowed, got 17"):
        filters_from_proto([pb(field="g", any_of=["a"])] * (MAX_FILTERS + 1))


def test_filters_on_a_model_without_a_catalog_are_refused_not_ignored() -> None:
    """check_filters: no filters is None; filters with no catalog are an error, never dropped."""
    from slimrank.serving.text_validation import check_filters
    from slimrank.serving.validation import ValidationError

    assert check_filters(None, [], "v1") is None
    with pytest.raises(ValidationError, match="model v1 has no item attributes") as info:
        check_filters(None, [ItemFilter("genre", ("g1",))], "v1")
    assert info.value.field == "filters"
