"""A published pipeline bundle served by the real server on port 0, through the real client.

Every answer is compared with a reference computed from the pipeline's own artifacts and
functions (its test-view candidates and features, its FAISS index, ``mine_candidates``,
``candidate_features``, ``rank_candidates``), not from the serving code path.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from blocking_snapshot import failing
from prometheus_client import CollectorRegistry
from served_store import serving
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.bundle import Bundle, open_bundle
from slimrank.bundle.formats import read_npy
from slimrank.cli import main
from slimrank.compression.scorer import Scorer
from slimrank.pipeline.artifacts import DataArtifact, IndexArtifact, load_view
from slimrank.pipeline.publish import load_bundle_tables, read_serving
from slimrank.pipeline.run import RunResult, run_pipeline
from slimrank.ranking.candidates import Candidates, mine_candidates
from slimrank.ranking.features import candidate_features
from slimrank.ranking.histories import Histories
from slimrank.ranking.pipeline_eval import rank_candidates
from slimrank.retrieval.two_tower import load_model
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.loader import load_snapshot
from slimrank.serving.reload import bundle_reload_fn
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder

K = 10


@dataclasses.dataclass(frozen=True)
class Served:
    run: TinyRun
    bundle: Bundle
    result: RunResult
    client: SlimrankClient


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run = tiny_pipeline(tmp_path_factory)
    with serving(run.bundles) as (_, _, client):
        yield Served(run, open_bundle(run.bundles, run.version), run_pipeline(run.config), client)


def _scorer(bundle: Bundle) -> Scorer:
    return Scorer(bundle.file("ranker.onnx"), bundle.manifest.files["ranker.onnx"].sha256)


def test_snapshot_takes_the_bundles_candidates_and_seen_items(served: Served) -> None:
    snapshot = load_snapshot(served.bundle)
    assert snapshot.n_candidates == read_serving(served.bundle.path).candidates == 30
    seen = DataArtifact.load(served.bundle.path / "data").split.seen_for_test()
    assert snapshot.seen is not None
    assert (snapshot.seen.matrix() != (seen > 0)).nnz == 0


def test_known_users_get_the_offline_ranking(served: Served) -> None:
    """Server top k == the pipeline's test view (seen items excluded), ranked by its ranker."""
    cands, feats, _ = load_view(served.result.path("candidates") / "test.safetensors")
    item_ids = read_npy(served.bundle.file("items.npy"))
    user_ids = read_npy(served.bundle.file("users.npy"))
    seen = DataArtifact.load(served.bundle.path / "data").split.seen_for_test()
    scorer = _scorer(served.bundle)
    rows = np.unique(np.linspace(0, len(cands) - 1, 6).astype(int))
    for row in rows:
        # One user's candidates are one batch, as in one request.
        scores = scorer.score(feats.values[row])  # (N,)
        top = rank_candidates(cands.items[row : row + 1], scores[None], K)[0]  # (K,)
        user = int(cands.user[row])
        got = served.client.recommend(str(user_ids[user]), K)
        assert got.user_source == "KNOWN"
        assert got.model_version == served.run.version
        assert got.candidates == cands.n
        assert got.item_ids == tuple(str(item_ids[i]) for i in top if i >= 0)
        by_item = dict(zip(cands.items[row].tolist(), scores.tolist(), strict=True))
        np.testing.assert_allclose(got.scores, [by_item[i] for i in top], rtol=1e-5, atol=1e-5)
        assert not set(top.tolist()) & set(seen[user].indices.tolist())


def test_unknown_user_with_recent_items_is_ranked_as_a_user_with_that_history(
    served: Served,
) -> None:
    """Reference: the pipeline's two-tower on the recent items with zeros for the user features
    a new user lacks, its index, and its tables with the user appended (that history, no side
    features) through ``candidate_features``."""
    bundle = served.bundle
    item_ids = read_npy(bundle.file("items.npy"))
    item_vecs = read_npy(bundle.file("item_vectors.npy"))
    tables = load_bundle_tables(bundle.path)
    n_users, n_items = tables.n_users, tables.n_items
    n = read_serving(bundle.path).candidates
    recent = np.array([3, 17, 40])
    model = load_model(served.result.path("two_tower") / "model")
    config, tower = model.config, model.user_tower
    # tiny.toml's tower: user features (age), an MLP, normalized; no user id, no item bias.
    assert tower.features is not None and tower.id_embedding is None
    assert config.projection and config.normalize and not config.item_bias
    with torch.no_grad():
        sums, counts = tower.pool(torch.as_tensor(recent), torch.zeros(1, dtype=torch.int64))
        pooled = model.pool_scale(sums, counts)  # (1, D)
        parts = [torch.zeros_like(pooled), pooled]  # user features, history
        vector = F.normalize(tower.mlp(torch.cat(parts, dim=1)), dim=-1)[0].numpy()  # (d,)
    assert np.abs(vector - item_vecs[recent].mean(axis=0)).max() > 1e-2  # not the old mean
    row = sp.csr_matrix(
        (np.ones(len(recent), np.float32), (np.zeros(len(recent), int), recent)),
        shape=(1, n_items),
    )
    index = IndexArtifact.load(served.result.path("index")).index
    mined = mine_candidates(vector[None], index.search, np.array([0]), n, row)
    hist = tables.history  # the new user is appended as the last row, newest item first
    appended = dataclasses.replace(
        tables,
        history=Histories(
            np.append(hist.indptr, hist.indptr[-1] + len(recent)),
            np.concatenate([hist.items, recent[::-1]]),
            n_items,
        ),
        user_vecs=np.vstack([tables.user_vecs, vector[None]]),
        user_side=np.vstack([tables.user_side, np.zeros((1, tables.user_side.shape[1]))]),
    )
    cands = Candidates(np.array([n_users]), mined.items, mined.retrieval_score)
    feats = candidate_features(appended, cands)
    scores = _scorer(bundle).score(feats.values[0])  # (N,)
    top = rank_candidates(cands.items, scores[None], K)[0]

    got = served.client.recommend("someone-new", K, recent=[str(item_ids[i]) for i in recent])
    assert got.user_source == "RECENT"
    assert got.item_ids == tuple(str(item_ids[i]) for i in top if i >= 0)
    by_item = dict(zip(cands.items[0].tolist(), scores.tolist(), strict=True))
    np.testing.assert_allclose(got.scores, [by_item[i] for i in top], rtol=1e-5, atol=1e-5)
    assert not set(got.item_ids) & {str(item_ids[i]) for i in recent}


def test_unknown_user_without_history_gets_the_most_popular_items(served: Served) -> None:
    item_ids = read_npy(served.bundle.file("items.npy"))
    seen = DataArtifact.load(served.bundle.path / "data").split.seen_for_test()
    popularity = np.asarray(seen.sum(axis=0)).ravel()  # (I,) train + valid interactions
    top = np.argsort(-popularity, kind="stable")[:K]
    got = served.client.recommend("someone-new", K)
    assert got.user_source == "POPULAR"
    assert got.item_ids == tuple(str(item_ids[i]) for i in top)
    np.testing.assert_array_equal(got.scores, popularity[top])


def test_query_prints_the_ranked_items_and_the_model_version(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    user = str(read_npy(served.bundle.file("users.npy"))[4])
    expected = served.client.recommend(user, 5)
    args = ["--target", served.client.target, "--user", user, "-k", "5"]
    code = main(["query", *args, "--bundles", str(served.run.bundles)])
    out = capsys.readouterr().out
    assert code == 0
    assert served.run.version in out
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert [line.split("│")[2].strip() for line in lines] == list(expected.item_ids)
    # The bundle's catalog carries display titles (the synthetic items' made-up ones).
    titles = read_npy(served.bundle.file("catalog/titles.npy"))
    row = {str(item): i for i, item in enumerate(read_npy(served.bundle.file("items.npy")))}
    shown = [line.split("│")[3].strip() for line in lines]
    assert shown == [titles[row[item]] for item in expected.item_ids]


def test_query_errors_are_one_line_and_exit_2(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    target = served.client.target
    assert main(["query", "--target", target, "--user", "u1", "-k", "101"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "slimrank query: request refused: k: must be in [1, 100], got 101"
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    assert main(["query", "--target", closed, "--user", "u1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slimrank query: server {closed} unreachable: ")
    assert "\n" not in err


def test_query_trims_the_recent_items_and_defaults_to_10(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [str(i) for i in read_npy(served.bundle.file("items.npy"))[[3, 8]]]
    expected = served.client.recommend("", 4, recent=items)
    assert expected.user_source == "RECENT"
    target = served.client.target
    assert (
        main(["query", "--target", target, "--recent", f" {items[0]} , ,{items[1]} ", "-k", "4"])
        == 0
    )
    out = capsys.readouterr().out
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    assert [r[2].strip() for r in rows] == list(expected.item_ids)
    assert [r[1].strip() for r in rows] == ["1", "2", "3", "4"]  # ranks count from 1
    assert out.startswith("anonymous user (recent): ")
    user = str(read_npy(served.bundle.file("users.npy"))[2])
    assert main(["query", "--target", target, "--user", user]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"user {user} (known): ")
    assert sum(line.startswith("│") for line in out.splitlines()) == 10  # -k defaults to 10


def test_query_k_below_1_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # nothing is asked: the command line is refused first
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(SystemExit) as info:
        main(["query", "--target", closed, "--user", "u1", "-k", "0", "--timeout", "1"])
    assert info.value.code == 2
    assert "-k 0: must be >= 1" in capsys.readouterr().err


def test_query_exits_1_on_another_grpc_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Module docstring: 2 for unreachable or INVALID_ARGUMENT, 1 for any other gRPC error."""
    from slimrank.serving.snapshot import random_snapshot

    holder = SnapshotHolder(failing(random_snapshot("v1", dim=8), "broken ranker"))
    server, port = create_server(ServerConfig(), holder, CollectorRegistry())
    server.mark_serving()
    try:
        assert main(["query", "--target", f"127.0.0.1:{port}", "--user", "u1"]) == 1
    finally:
        server.shutdown(0).wait(5)
    lines = capsys.readouterr().err.splitlines()  # the server's log lines share stderr
    assert any(line.startswith("slimrank query: INTERNAL: ") for line in lines), lines


def test_query_table_shows_each_score() -> None:
    import io

    from rich.console import Console

    from slimrank.serving.client import Ranked
    from slimrank.serving.query import recommendation_table

    ranked = Ranked(("i1", "i2"), (2.5, 1.23456), "v7", 200, "RECENT")
    out = io.StringIO()
    Console(file=out, width=100).print(recommendation_table(ranked, {"i1": "Heat"}))
    rows = [line.split("│") for line in out.getvalue().splitlines() if line.startswith("│")]
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows][:1] == [("1", "i1", "Heat")]
    np.testing.assert_allclose([float(r[4]) for r in rows], ranked.scores, atol=1e-4)


def test_query_titles_of_a_version_not_in_the_store_are_current_ones(served: Served) -> None:
    """bundle_titles: a version absent from the local store (the server's may be newer) reads
    CURRENT's titles rather than failing."""
    from slimrank.serving.query import bundle_titles

    current = bundle_titles(served.run.bundles)
    assert current and bundle_titles(served.run.bundles, "v999-not-here") == current


@pytest.mark.parametrize("source", ["movielens-100k", "ml-100k"])
def test_query_titles_of_a_movielens_bundle_come_from_the_data_cache(
    tmp_path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    from slimrank.bundle import publish
    from slimrank.data.fetch import ML100K_FILES, movielens_dir
    from slimrank.serving.query import bundle_titles

    monkeypatch.setenv("SLIMRANK_DATA", str(tmp_path / "data"))
    cache = movielens_dir()
    cache.mkdir(parents=True)
    for name in ML100K_FILES:
        (cache / name).write_text("")
    (cache / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\n1\tToy Story\n2\tHeat\n"
    )
    (tmp_path / "x.txt").write_text("x")
    root = tmp_path / "bundles"
    publish(root, {"x.txt": tmp_path / "x.txt"}, config={"data": {"source": source}})
    assert bundle_titles(root) == {"1": "Toy Story", "2": "Heat"}
    other = tmp_path / "other"
    publish(other, {"x.txt": tmp_path / "x.txt"}, config={"data": {"source": "logs"}})
    assert bundle_titles(other) is None


def _republish(served: Served, root, edit) -> str:
    """Publish a copy of the served bundle whose files ``edit(directory)`` changed (checksums
    are recomputed: the bundle verifies, but what it holds is wrong)."""
    import shutil

    from slimrank.bundle import publish

    manifest = served.bundle.manifest

    def write(directory) -> None:
        for name, path in served.bundle.files.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        edit(directory)

    return publish(
        root, write, config=manifest.config, metrics=manifest.metrics, gate=manifest.gate
    )


def _edit_tables(name: str, change):
    def edit(directory) -> None:
        from slimrank.bundle.formats import read_tensors, write_tensors

        tensors = dict(read_tensors(directory / "features.safetensors"))
        tensors[name] = change(tensors[name].copy())
        write_tensors(directory / "features.safetensors", tensors)

    return edit


def _edit_spec(change):
    def edit(directory) -> None:
        import json

        spec = json.loads((directory / "serving.json").read_text())
        change(spec)
        (directory / "serving.json").write_text(json.dumps(spec))

    return edit


def _with_transform(norm):
    def change(spec) -> None:
        spec["format"] = 3
        spec["index"]["transform"] = {"kind": "mips_l2", "max_norm": norm}

    return change


def _bad_row(a):
    a[0, 0] = a.shape[0] + 5
    return a


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (_edit_tables("cooc/indices", _bad_row), "item rows must lie in"),
        (_edit_tables("ease/values", lambda a: a[:, :-1]), "must be one (I, W) shape"),
        (_edit_tables("history/items", lambda a: a[:-1]), "indptr must run from 0"),
        (_edit_spec(lambda s: s.update(format=1)), "format 1"),
        (_edit_spec(lambda s: s["features"].update(n_users=3)), "users"),
        (_edit_spec(lambda s: s["ranker"].update(file="../ranker.onnx")), "[ranker]['file']"),
        # A transform the index was not built with, and a malformed one.
        (_edit_spec(_with_transform(2.0)), "['transform'] has max_norm 2.0"),
        (_edit_spec(_with_transform("2")), "[index]['transform']['max_norm'] = '2'"),
    ],
)
def test_a_bundle_that_verifies_but_holds_wrong_tables_is_refused_naming_why(
    served: Served, tmp_path, edit, says: str
) -> None:
    from slimrank.bundle import BundleError

    bad = _republish(served, tmp_path, edit)
    with pytest.raises(BundleError) as info:
        load_snapshot(open_bundle(tmp_path, bad))
    assert says in str(info.value) and bad in str(info.value)


def _garbage(name: str):
    def edit(directory) -> None:
        (directory / name).write_bytes(b"not an onnx model " * 64)

    return edit


def test_reload_of_a_verified_bundle_with_a_garbage_ranker_is_failed_precondition(
    served: Served, tmp_path
) -> None:
    _republish(served, tmp_path, lambda directory: None)  # the bad one is not v000001
    bad = _republish(served, tmp_path, _garbage("ranker.onnx"))
    assert bad != served.run.version
    holder = SnapshotHolder(load_snapshot(served.bundle))
    server, port = create_server(
        ServerConfig(), holder, CollectorRegistry(), bundle_reload_fn(tmp_path), warm=False
    )
    server.mark_serving()
    try:
        with SlimrankClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.reload(bad)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "ranker.onnx cannot be read" in info.value.details()
            assert client.recommend("", K).model_version == served.run.version
    finally:
        server.shutdown(0).wait(5)
