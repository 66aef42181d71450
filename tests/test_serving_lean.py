"""The serving process stays lean: no torch, pandas, pyarrow, matplotlib or onnx in it.

``slimrank serve`` runs as a real subprocess on the tiny pipeline bundle; its
``/proc/<pid>/maps`` must map none of those libraries and its resident size must stay far below
what torch alone adds (about 230 MB). The import checks run each serving module, and every
slimrank module the serving code imports (lazily included), in a fresh interpreter; the
offline commands, with the train extra's modules absent, print one line naming the extra.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_pipeline import TinyRun, tiny_pipeline

from slimrank.bundle import publish
from slimrank.serving.loader import random_flat_bundle

REPO = Path(__file__).resolve().parents[1]
SERVING = REPO / "slimrank" / "serving"
# Modules the server must not import: the train extra's (onnx is the exporter, not onnxruntime).
HEAVY = ("torch", "pandas", "pyarrow", "matplotlib", "onnx", "onnxscript")
# Their shared objects, as /proc/<pid>/maps names them.
HEAVY_LIBRARIES = re.compile(
    r"/site-packages/(torch|pandas|pyarrow|matplotlib|onnx|onnxscript)/|libtorch|libarrow"
)
# The server on the tiny bundle measured 193 MiB (VmRSS) with torch and pandas gone, 530 MiB
# with them; torch alone adds about 230 MiB.
MAX_RSS_MIB = 320
READY = re.compile(r"serving on (\S+):(\d+) metrics (\S+) pids ([\d,]+)")

# Imports every module named in argv, then runs each JSON argv list of the rest through the CLI;
# prints {"heavy": {module: first importer}, "codes": [...]} as its last line.
PROBE = """
import importlib, json, sys
HEAVY = {heavy!r}
first = {{}}

def check(by):
    for name in HEAVY:
        if name in sys.modules and name not in first:
            first[name] = by

modules, commands = sys.argv[1].split(","), json.loads(sys.argv[2])
for module in filter(None, modules):
    importlib.import_module(module)
    check(module)
codes = []
if commands:
    from slimrank.cli import main
    for argv in commands:
        codes.append(main(argv))
        check("slimrank " + " ".join(argv))
print(json.dumps({{"heavy": first, "codes": codes}}))
"""

# Prepended to a probe: the modules of HEAVY are not installed, as in the slim install.
ABSENT = f"""
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
"""


def probe(modules: list[str], commands: list[list[str]] | None = None) -> dict:
    """Run PROBE in a fresh interpreter; return its report."""
    code = PROBE.format(heavy=HEAVY)
    args = [sys.executable, "-c", code, ",".join(modules), json.dumps(commands or [])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.strip().splitlines()
    return {**json.loads(last), "stdout": "\n".join(printed)}


def serving_modules() -> list[str]:
    """Return every module under slimrank/serving (not the generated proto stubs)."""
    names = []
    for path in sorted(SERVING.glob("*.py")):
        names.append(
            "slimrank.serving" if path.stem == "__init__" else f"slimrank.serving.{path.stem}"
        )
    return names


def imported_by(module: str, lazy: bool) -> set[str]:
    """Return the slimrank modules ``module`` imports: at module level, or anywhere if ``lazy``."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = REPO / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimrank"):
            found.add(node.module)
            for alias in node.names:  # from slimrank.serving import query: a module
                if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimrank")}
    return {name for name in found if ".proto" not in name}


def serving_closure() -> list[str]:
    """Return the serving modules and the slimrank modules they import, transitively.

    A serving module's lazy imports (inside functions: the pipeline loader's) count; other
    modules' count only at module level (``load_dataset``'s CSV readers are not served).
    """
    roots = serving_modules()
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(imported_by(module, lazy=module in roots) - seen)
    return sorted(seen)


def test_the_closure_reaches_the_pipeline_loaders_lazy_imports() -> None:
    closure = serving_closure()
    for module in ("slimrank.compression.scorer", "slimrank.retrieval.index_io"):
        assert module in closure  # imported inside load_pipeline_bundle
    assert "slimrank.retrieval.two_tower" not in closure  # the torch model itself


def test_no_serving_module_imports_a_train_only_library() -> None:
    # Plus the command line and every area's parser (their handlers import lazily).
    parsers = [
        f"slimrank.{path.parent.name}.cli" for path in sorted(REPO.glob("slimrank/*/cli.py"))
    ]
    report = probe([*serving_closure(), "slimrank.cli", *parsers])
    assert report["heavy"] == {}, (
        f"imported (library: first module whose import loaded it): {report['heavy']}"
    )


def test_the_bundle_commands_import_no_train_only_library(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    v1 = publish(root, random_flat_bundle("a", seed=1))
    v2 = publish(root, random_flat_bundle("b", seed=2))
    r = ["--root", str(root)]
    commands = [
        ["bundle", "list", *r],
        ["bundle", "show", *r],
        ["bundle", "verify", *r, v1],
        ["bundle", "diff", *r, v1, v2],
        ["bundle", "rollback", *r],
        ["bundle", "promote", *r, v2],
        ["bundle", "history", *r],
    ]
    report = probe([], commands)
    assert report["codes"] == [0] * len(commands)
    assert report["heavy"] == {}, f"imported (module: first command): {report['heavy']}"


OFFLINE = {
    "retrieval train": ["retrieval", "train", "--dataset", "movielens-100k", "--out", "{tmp}/tt"],
    "data info": ["data", "info", "{tmp}/logs.csv"],
    "pipeline": ["pipeline", "--config", "tiny", "--bundles", "{tmp}/b", "--out", "{tmp}/out",
                 "--cache-dir", "{tmp}/cache"],
}  # fmt: skip


@pytest.mark.parametrize("argv", OFFLINE.values(), ids=OFFLINE.keys())
def test_an_offline_command_without_the_train_extra_says_how_to_install_it(
    tmp_path: Path, argv: list[str]
) -> None:
    (tmp_path / "logs.csv").write_text("user_id,item_id\nu1,i1\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    # The slim install: a finder that says each of HEAVY is not installed.
    code = f"{ABSENT}\nfrom slimrank.cli import main\nsys.exit(main({argv!r}))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("slimrank: error: this command needs "), done.stderr
    assert lines[-1].endswith("pip install 'slimrank[train]'")
    assert "Traceback" not in done.stderr


# -- the real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run: TinyRun) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """``slimrank serve`` on the tiny bundle: (process, target, pid of the serving process)."""
    ports = ["--port", "0", "--metrics-port", "0", "--admin-insecure"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimrank.cli", "serve", "--bundles", str(run.bundles), *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = READY.search(line)
        if match is None:
            proc.kill()
            raise AssertionError(f"no ready line, got {line!r}; stderr:\n{proc.communicate()[1]}")
        yield proc, f"{match[1]}:{match[2]}", int(match[4].split(",")[0])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_the_serving_process_maps_no_torch_or_pandas_and_stays_small(
    server: tuple[subprocess.Popen[str], str, int],
) -> None:
    _, _, pid = server
    maps = Path(f"/proc/{pid}/maps").read_text()
    heavy = sorted({line.split()[-1] for line in maps.splitlines() if HEAVY_LIBRARIES.search(line)})
    assert heavy == [], f"the server mapped {len(heavy)} train-only libraries: {heavy[:5]}"
    assert "onnxruntime" in maps  # the check reads the right process: the ranker's runtime is there
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])
    print(f"slimrank serve on the tiny bundle: VmRSS {rss_kib / 1024:.0f} MiB")
    assert rss_kib < MAX_RSS_MIB * 1024, f"VmRSS {rss_kib / 1024:.0f} MiB >= {MAX_RSS_MIB} MiB"


def test_query_answers_a_new_user_without_importing_a_train_only_library(
    server: tuple[subprocess.Popen[str], str, int], run: TinyRun
) -> None:
    _, target, pid = server
    argv = ["query", "--target", target, "--recent", "i1,i2,i3", "-k", "3", "--bundles"]
    report = probe([], [[*argv, str(run.bundles)]])
    assert report["codes"] == [0]
    assert "anonymous user (recent): " in report["stdout"], report["stdout"]
    assert report["heavy"] == {}, f"imported (module: first command): {report['heavy']}"
    # The new user's vector came from the numpy user tower, in the server that maps no torch.
    assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def test_text_search_loads_no_train_only_library(
    server: tuple[subprocess.Popen[str], str, int],
) -> None:
    """The search catalog is built offline (bm25s, pandas); serving it maps no train-only
    library: a typo, a prefix and a personalized search, then the process's maps."""
    from slimrank.serving.client import SlimrankClient

    _, target, pid = server
    with SlimrankClient(target, timeout=10.0) as client:
        assert client.search_text("winetr", 5).item_ids  # a typo
        assert client.search_text("star riv", 5).item_ids  # as typed: a prefix
        assert client.recommend("u3", 3).user_source == "KNOWN"
        assert client.search_text("garden city", 5, user_id="u3").user_source == "KNOWN"
    maps = Path(f"/proc/{pid}/maps").read_text()
    heavy = sorted({line.split()[-1] for line in maps.splitlines() if HEAVY_LIBRARIES.search(line)})
    assert heavy == [], f"text search mapped {len(heavy)} train-only libraries: {heavy[:5]}"
    assert "rapidfuzz" in maps  # the typo matcher ran in this process: the right one was read
