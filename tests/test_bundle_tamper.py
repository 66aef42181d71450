"""One flipped byte (same size) in any file of a published pipeline bundle is caught, and named.

Sizes alone miss it, so this is what proves the sha256 check runs for every kind of file
(``.safetensors``, ``.npy``, ``.onnx``, ``.faiss``, JSON, Parquet): through ``bundle verify``
on the command line and through the server's loader.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.bundle import open_bundle
from slimrank.bundle.checksums import ALTERED, Problem
from slimrank.bundle.store import verify_version
from slimrank.cli import main
from slimrank.errors import IntegrityError
from slimrank.serving.reload import bundle_reload_fn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_pipeline(tmp_path_factory)


def test_bundle_list_shows_the_pipeline_gates_verdict(
    tiny: TinyRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gate column reads what the int8 step really writes (it once read a key nothing
    wrote, so a published pipeline bundle showed an empty cell)."""
    manifest = open_bundle(tiny.bundles, tiny.version).manifest
    capsys.readouterr()
    assert main(["bundle", "list", "--root", str(tiny.bundles)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if tiny.version in line)
    assert f"pass ({manifest.gate['mode']})" in row


def _flip(path: Path) -> bytes:
    """Flip one bit of the middle byte in place (the size stays); return the old bytes."""
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    return data


def test_a_flipped_byte_in_any_bundle_file_is_refused_naming_it(
    tiny: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "bundles"
    shutil.copytree(tiny.bundles / tiny.version, root / tiny.version)
    files = sorted(open_bundle(root, tiny.version).manifest.files)
    kinds = {Path(name).suffix for name in files}
    assert {".safetensors", ".npy", ".onnx", ".json"} <= kinds, kinds
    load = bundle_reload_fn(root)
    for name in files:
        path = root / tiny.version / name
        if path.stat().st_size == 0:
            continue  # nothing to flip
        original = _flip(path)
        try:
            _, problems = verify_version(root, tiny.version)
            assert problems == [Problem(name, ALTERED, "sha256 differs")], name
            code = main(["bundle", "verify", tiny.version, "--root", str(root)])
            err = capsys.readouterr().err
            assert code == 2, name
            assert f"altered: {path}" in err, err
            with pytest.raises(IntegrityError, match=re.escape(f"altered: {path}")):
                load(tiny.version)  # the server verifies before it deserializes anything
        finally:
            path.write_bytes(original)
    load(tiny.version)  # every file restored: the bundle loads again
