"""Every name a bench script imports from slimrank exists.

The benches run outside the suite (on a demo or 1M cache), so a refactor that removes a
function they import goes unnoticed until someone runs them: three did when the pipeline's
steps moved to typed artifacts. This reads each script's imports (module level and inside
functions) without running it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def slimrank_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """Return ``(module, name or None, line)`` for each slimrank import in ``path``."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slimrank"):
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (alias.name, None, node.lineno)
                for alias in node.names
                if alias.name.startswith("slimrank")
            ]
    return found


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_import_names_that_exist(path: Path) -> None:
    missing = []
    for module_name, name, line in slimrank_imports(path):
        module = importlib.import_module(module_name)
        if name is None or hasattr(module, name):
            continue
        try:  # a submodule: from slimrank.pipeline import artifacts
            importlib.import_module(f"{module_name}.{name}")
        except ImportError:
            missing.append(f"{path.name}:{line}: {module_name}.{name}")
    assert not missing, missing


def test_the_import_reader_sees_imports_inside_functions(tmp_path: Path) -> None:
    script = tmp_path / "b.py"
    script.write_text(
        "from slimrank.config import Config\n"
        "def f():\n    from slimrank.pipeline.steps import load_data\n"
    )
    assert slimrank_imports(script) == [
        ("slimrank.config", "Config", 1),
        ("slimrank.pipeline.steps", "load_data", 3),
    ]
