"""Request bodies that do not parse, sent as raw bytes through a real channel to the real server.

Each is answered INVALID_ARGUMENT and logged as one WARNING line, never as an ERROR traceback
(which any client could repeat to flood the log), on both engines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from slimrank.serving.config import ServerConfig
from slimrank.serving.decoding import Malformed, lenient, malformed_message
from slimrank.serving.proto.slimrank.v1 import recommender_pb2
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

SEARCH = "/slimrank.v1.Recommender/Search"
RECOMMEND = "/slimrank.v1.Recommender/Recommend"
NOT_UTF8 = b"\x02\xc3\x28"  # a length-2 string field whose bytes are not UTF-8
BODIES = {
    SEARCH: {"corrupt wire format": b"\xff\xff\xff", "invalid UTF-8": b"\x1a" + NOT_UTF8},
    RECOMMEND: {"corrupt wire format": b"\xff\xff\xff", "invalid UTF-8": b"\x0a" + NOT_UTF8},
}
RESPONSES = {SEARCH: recommender_pb2.SearchResponse, RECOMMEND: recommender_pb2.RecommendResponse}
GOOD = {
    SEARCH: recommender_pb2.SearchRequest(query_vector=[0.1] * 8, k=3),
    RECOMMEND: recommender_pb2.RecommendRequest(user_id="u1", k=3),
}


@pytest.fixture(params=["aio", "sync"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[grpc.Channel, CollectorRegistry]]:
    registry = CollectorRegistry()
    holder = SnapshotHolder(random_snapshot("v1", dim=8))
    server, port = create_server(ServerConfig(engine=request.param), holder, registry)
    server.mark_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, registry
    channel.close()
    server.shutdown(0).wait(5)


def test_the_invalid_utf8_bodies_really_are_invalid() -> None:
    for method, message in GOOD.items():
        with pytest.raises(Exception, match="UTF-8"):
            type(message).FromString(BODIES[method]["invalid UTF-8"])


@pytest.mark.parametrize("method", [SEARCH, RECOMMEND])
@pytest.mark.parametrize("what", ["corrupt wire format", "invalid UTF-8"])
def test_a_malformed_body_is_invalid_argument_and_one_warning_line(
    served: tuple[grpc.Channel, CollectorRegistry],
    caplog: pytest.LogCaptureFixture,
    method: str,
    what: str,
) -> None:
    channel, registry = served
    raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as info:
        raw(BODIES[method][what], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request body: not a valid request message")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert method in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    counted = registry.get_sample_value(
        "slimrank_grpc_requests_total", {"method": method, "code": "INVALID_ARGUMENT"}
    )
    assert counted == 1
    # The server still answers a well-formed call on the same channel.
    answer = raw(GOOD[method].SerializeToString(), timeout=10)
    response = (
        recommender_pb2.SearchResponse if method == SEARCH else recommender_pb2.RecommendResponse
    )
    assert len(response.FromString(answer).items) == 3


def test_the_answer_and_the_log_line_say_which_method_and_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parse = lenient(recommender_pb2.RecommendRequest.FromString)
    body = BODIES[RECOMMEND]["corrupt wire format"]
    request = parse(body)
    assert isinstance(request, Malformed) and request.size == len(body)
    with pytest.raises(Exception) as info:
        recommender_pb2.RecommendRequest.FromString(body)
    reason = str(info.value)
    assert reason
    with caplog.at_level(logging.WARNING):
        message = malformed_message(RECOMMEND, request, "ipv4:10.0.0.7:5000")
    assert message == f"request body: not a valid request message for {RECOMMEND} ({reason})"
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{RECOMMEND} from ipv4:10.0.0.7:5000: malformed request body (3 bytes)")
    assert reason in line
    # An error without a message is named by its type.
    silent = Malformed(ValueError(), 5)
    assert malformed_message(SEARCH, silent, "p").endswith(f"{SEARCH} (ValueError)")
