"""Run the offline steps in order through the step cache, so an interrupted run resumes."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from slimrank.pipeline import compress_steps, steps
from slimrank.pipeline.cache import StepCache, StepOutput
from slimrank.pipeline.config import PipelineConfig
from slimrank.pipeline.engine import Engine, EngineConfig, open_engine
from slimrank.search.catalog import CATALOG_FORMAT

log = logging.getLogger(__name__)

STEPS = (
    "data",
    "catalog",
    "two_tower",
    "embeddings",
    "index",
    "candidates",
    "teacher",
    "student_plain",
    "student_distill",
    "student_pruned",
    "int8",
)

# Called when a step starts (seconds is None) and when it ends.
StepHook = Callable[[str, StepOutput | None, float | None], None]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Every step's output, by step name, plus the config that produced them."""

    config: PipelineConfig
    outputs: dict[str, StepOutput]

    def path(self, name: str) -> Path:
        return self.outputs[name].path

    def metrics(self, name: str) -> dict[str, Any]:
        """Return the ``metrics.json`` of a step."""
        return json.loads((self.path(name) / "metrics.json").read_text())

    def gate(self) -> dict[str, Any]:
        """Return the int8 step's gate summary."""
        return json.loads((self.path("int8") / "gate.json").read_text())

    @property
    def teacher_version(self) -> str:
        """The teacher's version id: ``teacher-`` and the first 16 hex of its step digest."""
        return teacher_version(self.outputs["teacher"])


def teacher_version(output: StepOutput) -> str:
    """Return the version id of a teacher step output (an imported one keeps its own)."""
    marker = output.path / "teacher_version.txt"
    if marker.exists():
        return marker.read_text().strip()
    return f"teacher-{output.digest[:16]}"


@dataclasses.dataclass(frozen=True)
class ImportedTeacher:
    """A trained teacher to reuse instead of training one: its directory and version id."""

    directory: Path  # holds teacher.safetensors and teacher.json
    version: str


def run_pipeline(
    config: PipelineConfig,
    hook: StepHook | None = None,
    provided: Mapping[str, StepOutput] | None = None,
    teacher: ImportedTeacher | None = None,
    engine: EngineConfig | None = None,
) -> RunResult:
    """Run (or load from the cache) every step; ``provided`` outputs replace those steps.

    ``provided`` is how retraining reuses a bundle's data and two-tower model; with
    ``teacher`` the teacher step only re-scores the new candidates with that teacher.
    ``engine`` chooses where mining, teacher scoring and student training run (default local).
    """
    engine = engine or EngineConfig()
    with open_engine(engine) as runner:
        return _run(config, hook, provided, teacher, engine, runner)


def _run(
    config: PipelineConfig,
    hook: StepHook | None,
    provided: Mapping[str, StepOutput] | None,
    teacher: ImportedTeacher | None,
    engine: EngineConfig,
    runner: Engine,
) -> RunResult:
    cache = StepCache(config.cache_dir)
    cache.clean_partial()
    provided = dict(provided or {})
    out: dict[str, StepOutput] = {}
    k = config.k

    def step(name: str, cfg: dict[str, Any], inputs: list[str], fn: Callable[..., None]) -> None:
        if name in provided:
            out[name] = provided[name]
            if hook:
                hook(name, out[name], 0.0)
            return
        if hook:
            hook(name, None, None)
        start = time.perf_counter()
        paths = [out[i].path for i in inputs]
        result = cache.run(
            name, cfg, {i: out[i].digest for i in inputs}, lambda tmp: fn(*paths, tmp)
        )
        out[name] = result
        seconds = time.perf_counter() - start
        log.info("step %s: %s in %.1f s", name, "cached" if result.cached else "done", seconds)
        if hook:
            hook(name, result, seconds)

    c = config
    step("data", c.data.to_dict(), [], lambda o: steps.data_step(c.data, o))
    # The search catalog reads the source's item text; data provided without a catalog (a
    # bundle published before catalogs existed) has none, and its bundle has no text search.
    if "data" not in provided or "catalog" in provided:
        step(
            "catalog",
            {"data": c.data.to_dict(), "text": c.text.to_dict(), "format": CATALOG_FORMAT},
            ["data"],
            lambda d, o: steps.catalog_step(c.data, c.text, d, o),
        )
    step(
        "two_tower",
        {"k": k, **c.two_tower.to_dict()},
        ["data"],
        lambda d, o: steps.two_tower_step(c.two_tower, d, o, k),
    )
    fold = {
        "target_frac": c.candidates.target_frac,
        "fold_seed": c.candidates.fold_seed,
        "folds": c.candidates.folds,
    }
    refit = c.two_tower.train if c.candidates.refit else None
    if refit is not None:  # fold models: keyed by how they are trained
        fold = {**fold, "refit": refit.to_dict()}
    step(
        "embeddings",
        fold,
        ["data", "two_tower"],
        lambda d, m, o: steps.embeddings_step(c.candidates, d, m, o, refit),
    )
    step(
        "index",
        c.index.to_dict(),
        ["data", "embeddings"],
        lambda d, e, o: steps.index_step(c.index, d, e, o),
    )
    step(
        "candidates",
        {"k": k, **c.candidates.to_dict()},
        ["data", "embeddings", "index"],
        lambda d, e, i, o: steps.candidates_step(c.candidates, k, d, e, i, o, runner),
    )
    if teacher is None:
        step(
            "teacher",
            {"k": k, **c.teacher.to_dict()},
            ["data", "candidates"],
            lambda d, cd, o: steps.teacher_step(c.teacher, k, d, cd, o, runner),
        )
    else:
        step(
            "teacher",
            {"k": k, "imported": teacher.version},
            ["data", "candidates"],
            lambda d, cd, o: steps.rescore_teacher_step(
                teacher.directory, teacher.version, k, d, cd, o, runner
            ),
        )
    for name, distill in (("student_plain", False), ("student_distill", True)):
        step(
            name,
            {"k": k, "distill": distill, **c.student.to_dict(), **engine.cache_key()},
            ["data", "candidates", "teacher"],
            lambda d, cd, t, o, distill=distill: compress_steps.student_step(
                c.student, distill, k, d, cd, t, o, runner
            ),
        )
    step(
        "student_pruned",
        {"k": k, "student": c.student.to_dict(), "prune": c.prune.to_dict()},
        ["data", "candidates", "teacher", "student_distill"],
        lambda d, cd, t, s, o: compress_steps.pruned_step(c.student, c.prune, k, d, cd, t, s, o),
    )
    step(
        "int8",
        {"k": k, **c.int8.to_dict()},
        ["data", "candidates", "teacher", "student_pruned"],
        lambda d, cd, t, p, o: compress_steps.int8_step(c.int8, k, d, cd, t, p, o),
    )
    return RunResult(config, out)
