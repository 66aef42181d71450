"""The committed gRPC stubs import from the package and match the .proto files."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "slimrank" / "serving" / "proto"


def test_stubs_import_from_the_package_with_canonical_descriptor_names() -> None:
    from slimrank.serving.proto.slimrank.v1 import admin_pb2, admin_pb2_grpc, recommender_pb2

    assert recommender_pb2.DESCRIPTOR.name == "slimrank/v1/recommender.proto"
    assert recommender_pb2.DESCRIPTOR.package == "slimrank.v1"
    assert admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name == "slimrank.v1.Admin"
    assert admin_pb2_grpc.AdminStub is not None
    request = recommender_pb2.RecommendRequest(user_id="u", k=3, exclude_item_ids=["a"])
    assert recommender_pb2.RecommendRequest.FromString(request.SerializeToString()) == request


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_committed_stubs_are_current(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run(
        ["bash", "scripts/gen_protos.sh", str(out)],
        cwd=ROOT,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(COMMITTED)
        for p in COMMITTED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed
    stale = [str(p) for p in generated if not filecmp.cmp(out / p, COMMITTED / p, shallow=False)]
    assert stale == [], "stubs are stale: run make protos"
