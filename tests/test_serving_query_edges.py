"""Edge queries through the real server and client, on an exact and an IVF-PQ index.

No answer carries a non-finite score, and a valid query gets ``k`` items whenever the catalog
has ``k`` items it may be given: a zero or tiny Search vector (FastScan returns nothing for
it), and a user known only by many recent items (exclusions eat what nprobe=1 reaches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from slimrank.retrieval.index import IndexConfig, build_index
from slimrank.retrieval.tuning import TuningConfig
from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot
from slimrank.serving.status import field_violations

DIM = 16
N_ITEMS = 2000


@pytest.fixture(scope="module")
def snapshots() -> dict[str, ModelSnapshot]:
    """The same catalog behind exact search and behind an untuned IVF32-PQ (nprobe 1)."""
    flat = random_snapshot("v1", n_items=N_ITEMS, dim=DIM)
    config = IndexConfig(pq_m=8, tuning=TuningConfig(enabled=False))
    index = build_index(flat.item_vectors, config, progress=False)
    assert index.factory_string.startswith("IVF")
    return {"flat": flat, "ivf": dataclasses.replace(flat, search=index.search)}


@pytest.fixture
def client() -> Iterator[Callable[[ModelSnapshot], SlimrankClient]]:
    servers, clients = [], []

    def _client(snapshot: ModelSnapshot) -> SlimrankClient:
        server, port = create_server(ServerConfig(), SnapshotHolder(snapshot), CollectorRegistry())
        server.mark_serving()
        servers.append(server)
        clients.append(SlimrankClient(f"127.0.0.1:{port}", timeout=10.0))
        return clients[-1]

    yield _client
    for c in clients:
        c.close()
    for s in servers:
        s.shutdown(0).wait(5)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_vector_whose_scores_overflow_is_refused_naming_the_field(
    snapshots: dict[str, ModelSnapshot],
    client: Callable[[ModelSnapshot], SlimrankClient],
    kind: str,
) -> None:
    c = client(snapshots[kind])
    huge = np.full(DIM, 3e38, dtype=np.float32)  # finite, but its dot products overflow
    with pytest.raises(grpc.RpcError) as info:
        c.search(huge.tolist(), 10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("query_vector: too large")
    assert "query_vector" in field_violations(info.value)
    # One huge component (the case) is either refused the same way or answered
    # with finite scores; a large but sane vector is answered.
    one = np.zeros(DIM, dtype=np.float32)
    one[3] = 3e38
    for vector in (one, huge / 1e36):
        try:
            got = c.search(vector.tolist(), 10)
        except grpc.RpcError as error:
            assert vector is one and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert len(got.item_ids) == 10 and np.isfinite(got.scores).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_a_zero_or_tiny_vector_gets_k_items_ranked_by_popularity(
    snapshots: dict[str, ModelSnapshot],
    client: Callable[[ModelSnapshot], SlimrankClient],
    kind: str,
    scale: float,
) -> None:
    snap = snapshots[kind]
    got = client(snap).search((snap.item_vectors[0] * scale).tolist(), 10)
    assert len(got.item_ids) == 10 == len(set(got.item_ids))
    assert np.isfinite(got.scores).all()
    # Every dot product is (about) 0, so every item ties on it: each score is the ranker's
    # popularity term of that item, best first.
    rows = [snap.item_row[i] for i in got.item_ids]
    np.testing.assert_allclose(got.scores, 0.1 * np.log1p(snap.popularity[rows]), atol=1e-6)
    assert list(got.scores) == sorted(got.scores, reverse=True)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_user_known_by_many_recent_items_gets_k_items(
    snapshots: dict[str, ModelSnapshot],
    client: Callable[[ModelSnapshot], SlimrankClient],
    kind: str,
) -> None:
    snap = snapshots[kind]
    rng = np.random.default_rng(1)
    recent = [str(snap.item_ids[r]) for r in rng.choice(N_ITEMS, size=400, replace=False)]
    got = client(snap).recommend("newcomer", 100, recent=recent)
    assert got.user_source == "RECENT"
    assert len(got.item_ids) == 100 == len(set(got.item_ids))
    assert not set(got.item_ids) & set(recent)  # recent items are never recommended back
    assert got.candidates == 200  # n_candidates, all eligible
    assert np.isfinite(got.scores).all()
    assert list(got.scores) == sorted(got.scores, reverse=True)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.search([0.1] * DIM, 0), "k"),
        (lambda c: c.search([0.1] * (DIM + 1), 5), "query_vector"),
        (lambda c: c.recommend("u1", 5, exclude=[""]), "exclude_item_ids"),
        (lambda c: c.recommend("u" * 300, 5), "user_id"),
    ],
)
def test_invalid_argument_names_the_field_in_a_bad_request_detail(
    snapshots: dict[str, ModelSnapshot],
    client: Callable[[ModelSnapshot], SlimrankClient],
    call: Callable[[SlimrankClient], object],
    field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(client(snapshots["flat"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(info.value)
    assert list(violations) == [field]
    assert info.value.details() == f"{field}: {violations[field]}"
