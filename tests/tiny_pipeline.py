"""One tiny pipeline run (slimrank/configs/tiny.toml) published into a temporary bundles root.

Test modules that serve a real pipeline bundle call :func:`tiny_pipeline` from a module-scoped
fixture. The step cache lives in the session's base temporary directory, so the second module
in a session re-runs nothing but the publish.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimrank.bundle import current_version
from slimrank.cli import main
from slimrank.pipeline.config import PipelineConfig, load_config

TINY = Path(__file__).resolve().parent.parent / "slimrank" / "configs" / "tiny.toml"


@dataclasses.dataclass(frozen=True)
class TinyRun:
    bundles: Path
    version: str
    config: PipelineConfig  # tiny.toml with this run's cache_dir: run_pipeline() is all cached


def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Run and publish the tiny pipeline; fails the test if it does not publish."""
    cache = tmp_path_factory.getbasetemp() / "tiny-pipeline-cache"
    root = tmp_path_factory.mktemp("tiny-pipeline")
    bundles = root / "bundles"
    args = ["--cache-dir", str(cache), "--bundles", str(bundles), "--out", str(root / "out")]
    code = main(["pipeline", "--config", str(TINY), *args])
    version = current_version(bundles)
    if code != 0 or version is None:
        pytest.fail(f"the tiny pipeline exited {code} and published {version!r}")
    config = dataclasses.replace(load_config(TINY), cache_dir=str(cache))
    return TinyRun(bundles, version, config)
