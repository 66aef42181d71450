"""The pipeline is a graph of typed steps: each row of ``STEP_TABLE`` names the artifacts its
function takes and returns, and no step opens another step's files.

The types come from the step functions' own hints, and the file check reads the step
modules' source, so a step that goes back to taking a directory, or to opening
``split.safetensors`` by name, fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from slimrank.pipeline import compress_steps, steps
from slimrank.pipeline.artifacts import ARTIFACTS, Artifact, StepFiles
from slimrank.pipeline.run import STEP_TABLE, Step

_TABLE = {step.name: step for step in STEP_TABLE}
_ROWS = [(step, fn) for step in STEP_TABLE for fn in step.functions]


def _hints(fn: Callable[..., object]) -> dict[str, object]:
    """Return ``fn``'s annotations evaluated in its module; those only imported for type
    checking (``Engine``...) stay strings: an artifact type is always a runtime import."""
    hints: dict[str, object] = {}
    for name, value in inspect.get_annotations(fn).items():
        try:
            hints[name] = eval(value, fn.__globals__) if isinstance(value, str) else value
        except NameError:
            hints[name] = value
    return hints


def _artifact_params(fn: Callable[..., object]) -> tuple[list[type], dict[str, object]]:
    """Return the artifact types ``fn`` takes, in order, and all its evaluated hints."""
    hints = _hints(fn)
    params = inspect.signature(fn).parameters
    taken = [
        hints[name]
        for name in params
        if isinstance(hints.get(name), type) and issubclass(hints[name], Artifact)
    ]
    return taken, hints


@pytest.mark.parametrize("row", _ROWS, ids=lambda r: f"{r[0].name}:{r[1].__name__}")
def test_each_step_function_takes_and_returns_the_artifacts_its_row_declares(
    row: tuple[Step, Callable[..., object]],
) -> None:
    step, fn = row
    taken, hints = _artifact_params(fn)
    assert taken == [_TABLE[i].output for i in step.inputs], step.name
    assert hints["return"] is step.output, step.name
    assert step.output in ARTIFACTS
    # A step touches no directory but, for an artifact it writes in place, its own (``out``).
    paths = [name for name, hint in hints.items() if hint is Path and name != "return"]
    assert paths == (["out"] if issubclass(step.output, StepFiles) else []), step.name


def test_every_artifact_type_names_its_files() -> None:
    for kind in ARTIFACTS:
        assert kind.FILES, kind.__name__
    assert {step.output for step in STEP_TABLE} <= set(ARTIFACTS)


# A string that names a file: what a step would use to open one of its inputs' files.
_FILE_NAME = re.compile(r"^[\w./-]*\.(json|safetensors|npy|onnx|txt|faiss|csv)$")
# Readers of the external source, not of a step's directory.
_SOURCE_READERS = {"load_source", "load_dataset", "load_logs"}


def file_access(source: str) -> list[str]:
    """Return what in ``source`` opens a file by a name of its own: file-name literals, paths
    joined with a literal, and calls to readers (``load_*`` / ``read_*``, ``X.load``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _FILE_NAME.match(node.value):
                found.append(f"line {node.lineno}: file name {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if isinstance(node.right, ast.Constant | ast.JoinedStr):
                found.append(f"line {node.lineno}: path joined with a literal")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "load" or (
                name.startswith(("load_", "read_", "open")) and name not in _SOURCE_READERS
            ):
                found.append(f"line {node.lineno}: reads with {name}()")
    return found


@pytest.mark.parametrize("module", [steps, compress_steps], ids=lambda m: m.__name__)
def test_no_step_module_opens_a_file_by_name(module: object) -> None:
    assert file_access(Path(inspect.getfile(module)).read_text()) == []  # type: ignore[arg-type]


def test_the_file_check_catches_a_step_that_reaches_into_its_input_directory() -> None:
    """The check above on the shapes the steps had before the artifacts took over."""
    old = (
        "def index_step(config, data_dir, emb_dir, out):\n"
        "    split = artifacts.load_split(data_dir / 'split.safetensors')\n"
        "    emb = load_embeddings(emb_dir, split.n_users, split.n_items)\n"
        "    write_json(out / f'seed{seed}', {})\n"
    )
    found = file_access(old)
    assert any("'split.safetensors'" in f for f in found)
    assert any("load_embeddings" in f for f in found)
    assert sum("joined with a literal" in f for f in found) == 2


def test_step_lines_number_the_steps_and_say_how_each_ended(tmp_path: Path) -> None:
    """``pipeline`` and ``retrain`` print ``[i/N] step`` (1-based, in table order) and whether
    the step ran, came from the cache or was provided by the bundle."""
    import io

    from rich.console import Console

    from slimrank.pipeline.cache import StepOutput
    from slimrank.pipeline.console import StepPrinter

    out = io.StringIO()
    printer = StepPrinter(Console(file=out, width=120, color_system=None))
    n = len(STEP_TABLE)
    first, last = STEP_TABLE[0].name, STEP_TABLE[-1].name
    printer(first, StepOutput(first, "0" * 64, tmp_path / "d-1", cached=False), 0.0)
    printer("two_tower", StepOutput("two_tower", "1" * 64, tmp_path / "t-2", cached=True), 0.1)
    printer(last, None, None)  # started: a spinner, no line
    printer(last, StepOutput(last, "2" * 64, tmp_path / "p-3", cached=False), 2.5)
    lines = [line.split() for line in out.getvalue().splitlines()]
    tower = 1 + [s.name for s in STEP_TABLE].index("two_tower")
    assert lines == [
        ["[", "1/" + str(n) + "]", first, "provided", "d-1"],
        ["[", f"{tower}/{n}]", "two_tower", "cached", "t-2"],
        [f"[{n}/{n}]", last, "done", "in", "2.5", "s", "p-3"],
    ]
