"""The HTTP/JSON endpoint: the real server on port 0, through urllib, against the gRPC answers."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from blocking_snapshot import blocking, failing
from prometheus_client import CollectorRegistry
from registry_samples import sample_sum

from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.server import SlimrankServer, create_server
from slimrank.serving.snapshot import ModelSnapshot, SnapshotHolder, random_snapshot

DIM = 16


@dataclasses.dataclass
class Running:
    server: SlimrankServer
    holder: SnapshotHolder
    registry: CollectorRegistry
    client: SlimrankClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return sample_sum(self.registry, name, labels)


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def _start(snapshot: ModelSnapshot | None = None, **config: Any) -> Running:
        holder = SnapshotHolder(snapshot or random_snapshot("v1", dim=DIM))
        registry = CollectorRegistry()
        server, port = create_server(ServerConfig(http_port=0, **config), holder, registry)
        server.mark_serving()
        running.append(Running(server, holder, registry, SlimrankClient(f"127.0.0.1:{port}")))
        return running[-1]

    yield _start
    for r in running:
        r.client.close()
        r.server.shutdown(0).wait(5)


def post(
    url: str, body: bytes | dict, content_type: str = "application/json", method: str = "POST"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST ``body`` (a dict is sent as JSON); return status, JSON answer and headers."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": content_type}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_recommend_and_search_answer_what_grpc_answers(start: Callable[..., Running]) -> None:
    r = start()
    snap = r.holder.get()
    cases = [
        ({"user_id": "u5", "k": 10, "exclude_item_ids": ["i3"]}, ("u5", 10, (), ("i3",))),
        ({"userId": "new", "recentItemIds": ["i1", "i2"], "k": 7}, ("new", 7, ("i1", "i2"), ())),
        ({"k": 4}, ("", 4, (), ())),  # no user, no history: popular items
    ]
    for body, (user, k, recent, exclude) in cases:
        status, answer, headers = post(f"{r.url}/v1/recommend", body)
        expected = r.client.recommend(user, k, recent=recent, exclude=exclude)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert tuple(item["item_id"] for item in answer["items"]) == expected.item_ids
        np.testing.assert_allclose([i["score"] for i in answer["items"]], expected.scores, 1e-6)
        assert answer["model_version"] == expected.model_version == "v1"
        assert answer["candidates"] == expected.candidates
        assert answer["user_source"] == f"USER_SOURCE_{expected.user_source}"

    vector = snap.item_vectors[9].tolist()
    status, answer, _ = post(f"{r.url}/v1/search", {"query_vector": vector, "k": 5})
    expected = r.client.search(vector, 5)
    assert status == 200
    assert tuple(item["item_id"] for item in answer["items"]) == expected.item_ids
    assert len(expected.item_ids) == 5


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/recommend", {"user_id": "u1", "k": 0}, "k"),
        ("/v1/recommend", {"user_id": "u1"}, "k"),  # k is required
        ("/v1/recommend", {"user_id": "u1", "k": "ten"}, "k"),
        ("/v1/recommend", {"user_id": "u1", "k": 3, "exclude_item_ids": [""]}, "exclude_item_ids"),
        ("/v1/recommend", {"user_id": "x" * 300, "k": 3}, "user_id"),
        ("/v1/recommend", {"user": "u1", "k": 3}, "user"),  # unknown field
        ("/v1/search", {"query_vector": [1.0, 2.0], "k": 3}, "query_vector"),
        ("/v1/recommend:batch", {"requests": [{"k": 3}, {"k": 0}]}, "requests[1].k"),
        ("/v1/recommend:batch", {"requests": [{"k": 3}, {"kk": 3}]}, "requests[1].kk"),
        (
            "/v1/recommend",
            {"k": 3, "filters": [{"field": "genre"}, {"field": "release_year", "min": "abc"}]},
            "filters[1].min",
        ),
        ("/v1/recommend", {"user_id": "u1", "k": 3.5}, "k"),
        ("/v1/recommend:batch", {"requests": [{"k": 3}, {"k": 3.5}]}, "requests[1].k"),
        (
            "/v1/recommend:batch",
            {"requests": [{"k": 3, "filters": [{"field": "genre", "min": "z"}]}]},
            "requests[0].filters[0].min",
        ),
    ],
)
def test_bad_input_is_400_naming_the_field(
    start: Callable[..., Running], path: str, body: dict, field: str
) -> None:
    r = start()
    status, answer, _ = post(f"{r.url}{path}", body)
    assert status == 400
    assert answer["code"] == "INVALID_ARGUMENT"
    assert answer["field"] == field
    assert field.split("[")[0] in answer["message"]


def test_what_is_not_a_json_call_is_refused_plainly(start: Callable[..., Running]) -> None:
    r = start(max_http_body_bytes=2048)
    ok = {"user_id": "u1", "k": 3}
    assert post(f"{r.url}/v1/recommend", json.dumps(ok).encode(), "text/plain")[0] == 415
    # JSON under a structured-syntax suffix is JSON (README, Calling slimrank); text/json not.
    assert post(f"{r.url}/v1/recommend", ok, "application/vnd.api+json")[0] == 200
    assert post(f"{r.url}/v1/recommend", ok, "text/json")[0] == 415
    assert post(f"{r.url}/v1/recommend", ok, "application/jsonx")[0] == 415
    assert post(f"{r.url}/v1/recommend", b"{not json")[0] == 400
    assert post(f"{r.url}/v1/recommend", b"\xff\xfe")[0] == 400
    # JSON, but not an object: said as such, not as a field named after an array's item.
    for body in (b"[1, 2]", b"42", b"null", b'"u1"', b"", b"  \n"):
        status, answer, _ = post(f"{r.url}/v1/recommend", body)
        assert (status, answer["code"]) == (400, "INVALID_ARGUMENT"), body
        assert answer["message"].startswith("body must be a JSON object"), answer
        assert "field" not in answer
    assert post(f"{r.url}/v1/recommend", b' \r\n\t{"user_id": "u1", "k": 3}')[0] == 200
    bom = b'\xef\xbb\xbf{"user_id": "u1", "k": 3}'  # a UTF-8 BOM, which RFC 8259 lets us ignore
    assert post(f"{r.url}/v1/recommend", bom)[0] == 200
    assert post(f"{r.url}/v1/recommend", b"\xef\xbb\xbf")[0] == 400  # nothing after it
    status, answer, _ = post(f"{r.url}/v1/nothing", ok)
    assert (status, answer["code"]) == (404, "NOT_FOUND")
    status, _, headers = post(f"{r.url}/v1/recommend", b"", method="GET")
    assert (status, headers["Allow"]) == (405, "POST")
    big = {"user_id": "u1", "k": 3, "exclude_item_ids": [f"i{i}" for i in range(400)]}
    assert post(f"{r.url}/v1/recommend", big)[0] == 413
    assert post(f"{r.url}/v1/recommend", ok)[0] == 200  # the server is fine afterwards


def test_a_body_up_to_the_limit_is_read_and_one_byte_more_is_413(
    start: Callable[..., Running],
) -> None:
    """README: a body over the limit (1 MiB by default) is 413; the limit itself is not over."""
    r = start(max_http_body_bytes=2048)
    body = json.dumps({"user_id": "u1", "k": 3}).encode()
    at_limit = body + b" " * (2048 - len(body))  # trailing JSON whitespace
    assert len(at_limit) == 2048
    assert post(f"{r.url}/v1/recommend", at_limit)[0] == 200
    status, answer, _ = post(f"{r.url}/v1/recommend", at_limit + b" ")
    assert (status, answer["code"]) == (413, "PAYLOAD_TOO_LARGE")


def _send_headers_and_part_of_the_body(port: int, body: bytes) -> socket.socket:
    """A raw HTTP/1.1 call whose Content-Length promises ``body`` but only half of it came."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def test_a_caller_stalled_in_its_body_holds_no_model_slot(start: Callable[..., Running]) -> None:
    """The body is read before admission, as gRPC has the whole message before its call is
    admitted: with one model slot, a caller that stops halfway through its body used to have
    every other HTTP call refused with 429 on an idle server."""
    r = start(max_inflight=1)
    body = json.dumps({"user_id": "u1", "k": 3}).encode()
    stalled = _send_headers_and_part_of_the_body(r.server.http_port, body)
    try:
        for _ in range(3):
            assert post(f"{r.url}/v1/recommend", {"user_id": "u2", "k": 3})[0] == 200
        stalled.sendall(body[len(body) // 2 :])  # the rest comes: it is answered, not lost
        answer = stalled.makefile("rb").read()
    finally:
        stalled.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"items"' in answer
    assert r.sample("slimrank_shed_requests_total") == 0


def test_a_chunked_body_over_the_limit_is_a_json_413(start: Callable[..., Running]) -> None:
    """No Content-Length to check first: the reader stops at the limit, answered in JSON."""
    r = start(max_http_body_bytes=2048)
    connection = http.client.HTTPConnection("127.0.0.1", r.server.http_port, timeout=10)
    chunks = (b" " * 1024 for _ in range(3))
    headers = {"Content-Type": "application/json"}
    connection.request("POST", "/v1/recommend", body=chunks, headers=headers, encode_chunked=True)
    response = connection.getresponse()
    assert (response.status, response.getheader("Content-Type")) == (413, "application/json")
    assert json.loads(response.read())["code"] == "PAYLOAD_TOO_LARGE"
    connection.close()
    route = {"route": "/v1/recommend", "status": "413"}
    assert r.sample("slimrank_http_requests_total", route) == 1


def test_a_caller_gone_before_its_body_arrived_is_no_server_error(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    r = start()
    body = json.dumps({"user_id": "u1", "k": 3}).encode()
    with caplog.at_level(logging.WARNING):
        _send_headers_and_part_of_the_body(r.server.http_port, body).close()
        assert post(f"{r.url}/v1/recommend", {"user_id": "u2", "k": 3})[0] == 200
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_application_json_with_parameters_or_in_any_case_is_json(
    start: Callable[..., Running], content_type: str
) -> None:
    """A media type is case-insensitive and may carry parameters (RFC 9110, 8.3.1)."""
    r = start()
    body = json.dumps({"user_id": "u1", "k": 3}).encode()
    status, answer, _ = post(f"{r.url}/v1/recommend", body, content_type)
    assert status == 200 and len(answer["items"]) == 3


@pytest.mark.parametrize("handler_threads", [1, 0])
def test_http_and_grpc_share_admission_and_http_sheds_with_429(
    start: Callable[..., Running], handler_threads: int
) -> None:
    """With model calls on the loop (0, the CLI's default) an HTTP call runs on a thread of
    its own: on the loop it was admitted only when the loop reached it, so HTTP never shed
    (an independent client: 2,000 concurrent calls all answered, p50 1.6 s)."""
    snap, entered, release = blocking(random_snapshot("v1", dim=DIM))
    r = start(snap, max_inflight=1, max_workers=4, handler_threads=handler_threads)
    held: list[tuple[int, dict, dict]] = []
    busy = threading.Thread(
        target=lambda: held.append(post(f"{r.url}/v1/recommend", {"user_id": "u1", "k": 3}))
    )
    busy.start()
    try:
        assert entered.acquire(timeout=5)  # an HTTP call holds the one model slot
        with pytest.raises(grpc.RpcError) as info:
            r.client.recommend("u2", 3)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, answer, headers = post(f"{r.url}/v1/recommend", {"user_id": "u2", "k": 3})
        assert (status, answer["code"]) == (429, "RESOURCE_EXHAUSTED")
        assert int(headers["Retry-After"]) >= 1
        assert r.sample("slimrank_inflight_requests") == 1
    finally:
        release.set()
        busy.join(10)
    assert held[0][0] == 200 and len(held[0][1]["items"]) == 3
    grpc_shed = r.sample(
        "slimrank_grpc_requests_total",
        {"method": "/slimrank.v1.Recommender/Recommend", "code": "RESOURCE_EXHAUSTED"},
    )
    assert grpc_shed >= 1  # the client may retry a shed call (its retry policy)
    assert r.sample("slimrank_shed_requests_total") == grpc_shed + 1  # and the HTTP one
    route = {"route": "/v1/recommend"}
    assert r.sample("slimrank_http_requests_total", {**route, "status": "429"}) == 1
    assert r.sample("slimrank_http_requests_total", {**route, "status": "200"}) == 1
    assert r.sample("slimrank_http_request_duration_seconds_count", route) == 2
    assert post(f"{r.url}/v1/recommend", {"user_id": "u2", "k": 3})[0] == 200  # slot given back


def test_the_routes_answer_series_exist_before_any_call(start: Callable[..., Running]) -> None:
    """Every route's 200, 400 and 429 series are exported at 0 from the start, so a rate over
    them (an alert, a dashboard) has data before the first refusal."""
    r = start()
    for route in ("/v1/recommend", "/v1/search", "/v1/recommend:batch"):
        for status in ("200", "400", "429"):
            labels = {"route": route, "status": status}
            assert r.registry.get_sample_value("slimrank_http_requests_total", labels) == 0.0


def test_a_batch_is_not_timed_as_one_call_for_admission() -> None:
    """The HTTP core with the real batch servicer: a batch's handler time is many calls' time
    and stays out of the estimate of one call (Admission.observe), as on gRPC."""
    from slimrank.serving.admission import Admission
    from slimrank.serving.batch import BatchRecommenderServicer
    from slimrank.serving.http_api import HttpApi
    from slimrank.serving.metrics import ServingMetrics

    metrics = ServingMetrics(CollectorRegistry())
    holder = SnapshotHolder(random_snapshot("v1", dim=DIM))
    servicer = BatchRecommenderServicer(holder, ServerConfig(), metrics)
    admission = Admission(limit=4, total=8)
    api = HttpApi(servicer, admission, metrics, None, 1 << 20)

    def call(path: str, body: dict) -> int:
        raw = json.dumps(body).encode()
        return asyncio.run(api.handle("POST", path, "application/json", raw)).status

    batch = {"requests": [{"user_id": f"u{u}", "k": 5} for u in range(20)]}
    assert call("/v1/recommend:batch", batch) == 200
    assert admission.mean_service_s == 0.0
    assert call("/v1/recommend", {"user_id": "u1", "k": 5}) == 200
    assert admission.mean_service_s > 0.0
    assert admission.total_in_progress == admission.limited_in_progress == 0


def test_http_calls_are_timed_by_stage_like_grpc_calls(start: Callable[..., Running]) -> None:
    r = start()
    before = r.sample("slimrank_stage_duration_seconds_count", {"stage": "rank"})
    assert post(f"{r.url}/v1/recommend", {"user_id": "u3", "k": 5})[0] == 200
    assert r.sample("slimrank_stage_duration_seconds_count", {"stage": "rank"}) == before + 1
    assert r.sample("slimrank_stage_duration_seconds_count", {"stage": "queue"}) >= 1


def test_http_endpoint_follows_a_model_swap(start: Callable[..., Running]) -> None:
    r = start()
    r.holder.swap(random_snapshot("v2", dim=DIM, seed=7))
    status, answer, _ = post(f"{r.url}/v1/recommend", {"user_id": "u1", "k": 3})
    assert (status, answer["model_version"]) == (200, "v2")


def test_http_port_needs_the_aio_engine() -> None:
    with pytest.raises(ValueError, match="http_port"):
        ServerConfig(engine="sync", http_port=0)


def test_no_http_endpoint_unless_asked(start: Callable[..., Running]) -> None:
    holder = SnapshotHolder(random_snapshot("v1", dim=DIM))
    server, _ = create_server(ServerConfig(), holder, CollectorRegistry())
    try:
        assert server.http_port is None
    finally:
        server.shutdown(0).wait(5)


def test_slimrank_serve_http_port_answers_as_grpc(tmp_path) -> None:
    """The real CLI: ``--http-port 0`` is announced and answers what gRPC answers."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from slimrank.bundle import publish
    from slimrank.serving.loader import random_flat_bundle

    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=1))
    command = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(root)]
    command += ["--port", "0", "--metrics-port", "-1", "--http-port", "0", "--poll-interval", "0"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"serving on (\S+) metrics - pids \d+ http (\S+)$", line.strip())
        assert match, line
        with SlimrankClient(match[1], timeout=5.0) as client:
            expected = client.recommend("u3", 5)
        status, answer, _ = post(f"http://{match[2]}/v1/recommend", {"user_id": "u3", "k": 5})
        assert status == 200
        assert tuple(item["item_id"] for item in answer["items"]) == expected.item_ids
        assert len(expected.item_ids) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_every_grpc_code_has_the_gateway_http_status() -> None:
    from slimrank.serving.http_api import HTTP_STATUS

    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    # The HTTP mapping google/rpc/code.proto gives each code (README: the status table).
    expected = {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
    }
    assert expected == HTTP_STATUS


def test_only_an_invalid_argument_error_names_a_field() -> None:
    from slimrank.serving.http_api import error_response

    named = json.loads(error_response(400, "INVALID_ARGUMENT", "k: must be in [1, 100]").body)
    assert named["field"] == "k"
    other = json.loads(error_response(404, "NOT_FOUND", "version: v9 is not in the store").body)
    assert other == {"code": "NOT_FOUND", "message": "version: v9 is not in the store"}


def test_a_failing_ranker_is_500_without_details(start: Callable[..., Running]) -> None:
    r = start(failing(random_snapshot("v1", dim=DIM), "secret internals"))
    status, answer, _ = post(f"{r.url}/v1/recommend", {"user_id": "u1", "k": 3})
    assert (status, answer["code"]) == (500, "INTERNAL")
    assert "secret" not in answer["message"]


def test_workers_share_a_fixed_http_port(tmp_path) -> None:
    """``--workers 2 --http-port N``: every worker binds N (SO_REUSEPORT) and it answers."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys

    from slimrank.bundle import publish
    from slimrank.serving.loader import random_flat_bundle

    root = tmp_path / "bundles"
    publish(root, random_flat_bundle("a", seed=1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(root)]
    command += ["--port", "0", "--metrics-port", "-1", "--workers", "2", "--poll-interval", "0"]
    proc = subprocess.Popen(
        [*command, "--http-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"pids (\d+),(\d+) http 127\.0\.0\.1:(\d+)$", line.strip())
        assert match and int(match[3]) == port, line
        with SlimrankClient(line.split()[2], timeout=5.0) as client:
            expected = client.recommend("u3", 4).item_ids
        for _ in range(6):  # each urlopen is a new connection, handed to either worker
            status, answer, _ = post(
                f"http://127.0.0.1:{port}/v1/recommend", {"user_id": "u3", "k": 4}
            )
            assert status == 200
            assert tuple(item["item_id"] for item in answer["items"]) == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with pytest.raises(SystemExit):
        from slimrank.cli import main

        main(["serve", "--workers", "2", "--http-port", "0"])


def test_an_abort_with_status_is_answered_like_an_abort() -> None:
    """Handlers that attach rich error details (``abort_with_status``) answer the same."""
    import collections

    from slimrank.serving.proto.slimrank.v1 import recommender_pb2_grpc

    status = collections.namedtuple("status", "code details trailing_metadata")

    class Refusing(recommender_pb2_grpc.RecommenderServicer):
        def Recommend(self, request: Any, context: Any) -> Any:
            context.abort_with_status(
                status(grpc.StatusCode.INVALID_ARGUMENT, "k: rich details attached", ())
            )

    holder = SnapshotHolder(random_snapshot("v1", dim=DIM))
    server, _ = create_server(
        ServerConfig(http_port=0), holder, CollectorRegistry(), recommender=lambda *_: Refusing()
    )
    try:
        url = f"http://127.0.0.1:{server.http_port}/v1/recommend"
        code, answer, _ = post(url, {"user_id": "u1", "k": 3})
    finally:
        server.shutdown(0).wait(5)
    assert (code, answer["field"]) == (400, "k")
