"""The README and docs/ say what the code does: links inside the repository, metric names,
the protos' package options for other languages and the calls reflection lists."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from slimrank.front.config import FrontConfig
from slimrank.front.run import FrontMetrics
from slimrank.serving.config import ServerConfig
from slimrank.serving.proto.slimrank.v1 import admin_pb2, recommender_pb2
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder, random_snapshot

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    return {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in path.read_text().splitlines()
        if line.startswith("#")
    }


def test_readme_and_docs_link_only_to_files_inside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert not re.search(r"\]\(\s*https?://", text), f"{doc.name}: a link outside"
        for target in LINK.findall(text):
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.is_relative_to(ROOT) and path.exists(), (doc.name, target)
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), (doc.name, target)


def test_readme_links_the_architecture_and_runbook_docs():
    links = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {"docs/architecture.md", "docs/runbook.md"} <= links


def test_architecture_lists_every_metric_the_server_and_front_export():
    registry = CollectorRegistry()
    holder = SnapshotHolder(random_snapshot("v1", dim=8))
    server, _ = create_server(ServerConfig(http_port=0), holder, registry)
    server.shutdown(0).wait(5)
    # `slimrank front`'s own metrics, listed in the same table: each limit's front.
    fronts = [CollectorRegistry(), CollectorRegistry()]
    FrontMetrics(fronts[0], FrontConfig(rate=1))
    FrontMetrics(fronts[1], FrontConfig(in_flight=1))
    exported = {
        m.name + ("_total" if m.type == "counter" else "")
        for r in (registry, *fronts)
        for m in r.collect()
        if m.name.startswith("slimrank_")
    }
    text = (ROOT / "docs" / "architecture.md").read_text()
    documented = set(re.findall(r"^\| `(slimrank_\w+)` \|", text, re.MULTILINE))
    assert documented == exported


def test_protos_name_packages_for_go_and_java():
    for module in (recommender_pb2, admin_pb2):
        options = module.DESCRIPTOR.GetOptions()
        assert options.go_package.endswith("slimrank/v1;slimrankv1"), module.__name__
        assert options.java_package == "dev.slimrank.v1"
        assert options.java_multiple_files


def test_reflection_lists_every_recommender_call():
    """What the README's grpcurl examples need: reflection on with --reflection."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    holder = SnapshotHolder(random_snapshot("v1", dim=8))
    server, port = create_server(ServerConfig(reflection=True), holder, CollectorRegistry())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            service = pool.FindServiceByName("slimrank.v1.Recommender")
            methods = {m.name for m in service.methods}
            request = pool.FindMessageTypeByName("slimrank.v1.RecommendRequest")
            fields = {f.name for f in request.fields}
    finally:
        server.shutdown(0).wait(5)
    assert methods == {"Recommend", "Search", "RecommendBatch"}
    assert {"user_id", "recent_item_ids", "k", "exclude_item_ids"} <= fields
