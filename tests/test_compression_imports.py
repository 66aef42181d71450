"""The compression library stands on its own: nothing in ``slimrank/compression`` imports the
offline pipeline (read from the source, lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import slimrank.compression

COMPRESSION = Path(slimrank.compression.__file__).parent


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_compression_never_imports_the_offline_pipeline() -> None:
    files = sorted(COMPRESSION.rglob("*.py"))
    assert len(files) > 5  # the package was found
    offenders = [
        f"{path.name}: {name}"
        for path in files
        for name in _imports(path)
        if name.startswith("slimrank.pipeline")
    ]
    assert offenders == []


def test_one_training_loop_takes_optimiser_steps() -> None:
    """Only the epoch loop in ``compression/fit.py`` calls ``optimizer.step()`` on a student:
    the pipeline's engines (local and Ray) call it rather than keeping copies."""
    roots = [COMPRESSION, COMPRESSION.parent / "pipeline"]
    stepping = sorted(
        f"{path.parent.name}/{path.name}"
        for root in roots
        for path in root.rglob("*.py")
        if ".step()" in path.read_text() and "optimizer" in path.read_text()
    )
    assert stepping == ["compression/fit.py"]
