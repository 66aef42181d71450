"""Run the offline steps in order through the step cache, so an interrupted run resumes."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slimrank.compression.gate import GATE_REVISION
from slimrank.config import Config
from slimrank.data.dataset import dataset_files
from slimrank.pipeline import artifacts, compress_steps, steps
from slimrank.pipeline.artifacts import (
    Artifact,
    CandidatesArtifact,
    CatalogArtifact,
    DataArtifact,
    EmbeddingsArtifact,
    IndexArtifact,
    Int8Artifact,
    PrecisionArtifact,
    SeedsArtifact,
    StudentArtifact,
    TeacherArtifact,
    TeacherModel,
    TwoTowerArtifact,
)
from slimrank.pipeline.cache import StepCache, StepOutput, step_digest
from slimrank.pipeline.config import SOURCES_SYNTHETIC, PipelineConfig
from slimrank.pipeline.engine import Engine, EngineConfig, open_engine
from slimrank.pipeline.inputs import InputDigests, InputFile
from slimrank.search.catalog import CATALOG_FORMAT

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One offline step: the steps whose artifacts it takes, the config it reads, its output.

    ``inputs`` name upstream steps: the runner loads each one's output artifact and passes
    them to the step's function in this order; the function returns an ``output`` artifact,
    which the runner saves (:mod:`slimrank.pipeline.artifacts`). ``functions`` are the
    functions that may run the step (the teacher has two: train, or re-score an imported
    one); ``tests/test_pipeline_graph.py`` checks their type hints against this row.

    ``reads`` are dotted paths into :class:`PipelineConfig` (a whole section, ``"prune"``, or
    one field, ``"candidates.folds"``). They are the step's cache key, so they must name all
    the config the step's code reads: changing any of it re-runs the step and what follows
    (``tests/test_pipeline_keys.py`` checks every field against this table).
    """

    name: str
    inputs: tuple[str, ...]
    reads: tuple[str, ...]
    output: type[Artifact]
    functions: tuple[Callable[..., Artifact], ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """What the step leaves in its directory: checked before its output is kept."""
        return self.output.FILES


_MINED = ("data", "candidates", "teacher")
_STUDENT = (compress_steps.student_step,)
_PRUNED = (compress_steps.pruned_step,)
STEP_TABLE = (
    Step("data", (), ("data",), DataArtifact, (steps.data_step,)),
    # The search catalog: the source's item text (its format is part of the key).
    Step("catalog", ("data",), ("data", "text"), CatalogArtifact, (steps.catalog_step,)),
    Step("two_tower", ("data",), ("k", "two_tower"), TwoTowerArtifact, (steps.two_tower_step,)),
    # The training folds, and (candidates.refit) each fold's two-tower, trained as two_tower is.
    Step(
        "embeddings",
        ("data", "two_tower"),
        (
            "candidates.target_frac",
            "candidates.fold_seed",
            "candidates.folds",
            "candidates.refit",
            "two_tower.train",
        ),
        EmbeddingsArtifact,
        (steps.embeddings_step,),
    ),
    Step("index", ("embeddings",), ("index",), IndexArtifact, (steps.index_step,)),
    Step(
        "candidates",
        ("data", "embeddings", "index"),
        ("k", "candidates"),
        CandidatesArtifact,
        (steps.candidates_step,),
    ),
    Step(
        "teacher",
        ("data", "candidates"),
        ("k", "teacher"),
        TeacherArtifact,
        (steps.teacher_step, steps.rescore_teacher_step),
    ),
    Step("student_plain", _MINED, ("k", "student"), StudentArtifact, _STUDENT),
    Step("student_distill", _MINED, ("k", "student"), StudentArtifact, _STUDENT),
    # The compression table's other methods (issue 14), each beside the one it varies.
    Step(
        "student_pseudo",
        _MINED,
        ("k", "student", "methods.pseudo_top_k"),
        StudentArtifact,
        _STUDENT,
    ),
    Step(
        "student_seeds",
        _MINED,
        ("k", "student", "methods.seeds"),
        SeedsArtifact,
        (compress_steps.seeds_step,),
    ),
    Step(
        "student_pruned",
        (*_MINED, "student_distill"),
        ("k", "student", "prune"),
        StudentArtifact,
        _PRUNED,
    ),
    Step(
        "pruned_taylor",
        (*_MINED, "student_distill"),
        ("k", "student", "prune"),
        StudentArtifact,
        _PRUNED,
    ),
    Step(
        "pruned_l1",
        (*_MINED, "student_distill"),
        ("k", "student", "prune", "methods.l1_penalty"),
        StudentArtifact,
        _PRUNED,
    ),
    Step(
        "int8",
        (*_MINED, "student_pruned"),
        ("k", "int8"),
        Int8Artifact,
        (compress_steps.int8_step,),
    ),
    Step(
        "precision",
        (*_MINED, "student_pruned"),
        ("k", "int8", "methods.precision"),
        PrecisionArtifact,
        (compress_steps.precision_step,),
    ),
)
# The two-tower step's extra reads when candidates.hold_out_labels holds some labels out.
HOLD_OUT_READS = (
    "candidates.hold_out_labels",
    "candidates.sample_users",
    "candidates.target_frac",
    "candidates.fold_seed",
    "candidates.folds",
)
STEPS = tuple(s.name for s in STEP_TABLE)
_TABLE = {s.name: s for s in STEP_TABLE}
# Config no step reads: where outputs go, and the report's latency benchmark.
NOT_IN_STEPS = ("cache_dir", "latency")


def check_outputs(step: Step, directory: Path) -> None:
    """Raise if ``step`` left one of its declared outputs out of ``directory``."""
    missing = step.output.missing(directory)
    if missing:
        raise RuntimeError(f"step {step.name} did not write {', '.join(missing)} in {directory}")


def config_at(config: PipelineConfig, path: str) -> Any:
    """Return the JSON-able value at a dotted config path (a section as its ``to_dict``)."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, Config):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


def step_config(
    step: Step,
    config: PipelineConfig,
    engine: EngineConfig | None = None,
    teacher: ImportedTeacher | None = None,
) -> dict[str, Any]:
    """Return the config part of ``step``'s cache key: what it reads, and how it runs."""
    if step.name == "teacher" and teacher is not None:
        return {"k": config.k, "imported": teacher.version}
    key = {path: config_at(config, path) for path in step.reads}
    if step.name == "catalog":
        key["format"] = CATALOG_FORMAT
    if step.name == "int8":
        key["gate_revision"] = GATE_REVISION
    if step.name == "two_tower" and config.candidates.hold_out_labels != "none":
        # What decides the held-out labels (the folds and their user sample); only when some
        # are held out, so the keys of runs that hold out nothing stay as they were.
        key.update({path: config_at(config, path) for path in HOLD_OUT_READS})
    if step.name in ("student_plain", "student_distill"):
        key.update(distill=step.name == "student_distill", **(engine or EngineConfig()).cache_key())
    if step.name == "student_pseudo":
        key.update((engine or EngineConfig()).cache_key())
    return key


def step_digests(
    config: PipelineConfig,
    engine: EngineConfig | None = None,
    files: Sequence[InputFile] = (),
) -> dict[str, str]:
    """Return every step's cache digest without running anything (``files``: the data step's)."""
    digests: dict[str, str] = {}
    for step in STEP_TABLE:
        digests[step.name] = step_digest(
            step.name,
            step_config(step, config, engine),
            {i: digests[i] for i in step.inputs},
            files if step.name == "data" else (),
        )
    return digests


def cached_step_paths(config: PipelineConfig) -> dict[str, Path]:
    """Return where each step's output lives in ``config``'s step cache once it has run (the
    directories ``run_pipeline(config)`` reads and writes; they need not exist yet)."""
    cache = StepCache(config.cache_dir)
    digests = step_digests(config, files=data_inputs(config))
    return {step: cache.path_for(step, digest) for step, digest in digests.items()}


def data_inputs(config: PipelineConfig) -> list[InputFile]:
    """Return the content keys of the files the data step reads (none for synthetic data)."""
    if config.data.source == SOURCES_SYNTHETIC:
        return []
    return InputDigests(config.cache_dir).digest(dataset_files(config.data.source))


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
        return artifacts.load_metrics(self.path(name))

    def gate(self) -> dict[str, Any]:
        """Return the int8 step's gate summary."""
        return Int8Artifact.load(self.path("int8")).gate

    @property
    def teacher_version(self) -> str:
        """The teacher's version id: ``teacher-`` and the first 16 hex of its step digest."""
        return teacher_version(self.outputs["teacher"])


def teacher_version(output: StepOutput) -> str:
    """Return the version id of a teacher step output (an imported one keeps its own)."""
    return artifacts.imported_version(output.path) or f"teacher-{output.digest[:16]}"


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

    def step(name: str, call: Callable[..., Artifact], files: Sequence[InputFile] = ()) -> None:
        """Run ``call(*input artifacts, own directory)`` through the cache, save its output."""
        if name in provided:
            out[name] = provided[name]
            if hook:
                hook(name, out[name], 0.0)
            return
        if hook:
            hook(name, None, None)
        start = time.perf_counter()
        spec = _TABLE[name]
        upstream = [(_TABLE[i].output, out[i].path) for i in spec.inputs]

        def produce(tmp: Path) -> None:
            result = call(*(kind.load(path) for kind, path in upstream), tmp)
            if not isinstance(result, spec.output):
                raise TypeError(
                    f"step {name} returned {type(result).__name__}, not {spec.output.__name__}"
                )
            result.save(tmp)
            check_outputs(spec, tmp)

        result = cache.run(
            name,
            step_config(spec, config, engine, teacher),
            {i: out[i].digest for i in spec.inputs},
            produce,
            files,
        )
        out[name] = result
        seconds = time.perf_counter() - start
        log.info("step %s: %s in %.1f s", name, "cached" if result.cached else "done", seconds)
        if hook:
            hook(name, result, seconds)

    c = config
    files = [] if "data" in provided else data_inputs(c)
    step("data", lambda o: steps.data_step(c.data), files)
    # The search catalog reads the source's item text; data provided without a catalog (a
    # bundle published before catalogs existed) has none, and its bundle has no text search.
    if "data" not in provided or "catalog" in provided:
        step("catalog", lambda d, o: steps.catalog_step(c.data, c.text, d))
    step("two_tower", lambda d, o: steps.two_tower_step(c.two_tower, d, k, c.candidates))
    refit = c.two_tower.train if c.candidates.refit else None
    step("embeddings", lambda d, m, o: steps.embeddings_step(c.candidates, d, m, refit))
    step("index", lambda e, o: steps.index_step(c.index, e))
    step(
        "candidates",
        lambda d, e, i, o: steps.candidates_step(c.candidates, k, d, e, i, runner),
    )
    if teacher is None:
        step("teacher", lambda d, cd, o: steps.teacher_step(c.teacher, k, d, cd, runner))
    else:
        imported = teacher

        def rescore(d: DataArtifact, cd: CandidatesArtifact, o: Path) -> TeacherArtifact:
            model = TeacherModel.load(imported.directory, imported.version)
            return steps.rescore_teacher_step(model, k, d, cd, runner)

        step("teacher", rescore)
    compression_threads(c.teacher.train.threads)
    for name, kind in (
        ("student_plain", "plain"),
        ("student_distill", "distill"),
        ("student_pseudo", "pseudo"),
    ):
        step(
            name,
            lambda d, cd, t, o, kind=kind: compress_steps.student_step(
                c.student, kind, k, d, cd, t, o, runner, c.methods.pseudo_top_k
            ),
        )
    step(
        "student_seeds",
        lambda d, cd, t, o: compress_steps.seeds_step(c.student, c.methods.seeds, k, d, cd, t, o),
    )
    for name, method in (
        ("student_pruned", "magnitude"),
        ("pruned_taylor", "taylor"),
        ("pruned_l1", "l1"),
    ):
        step(
            name,
            lambda d, cd, t, s, o, method=method: compress_steps.pruned_step(
                c.student, c.prune, k, d, cd, t, s, o, method, c.methods.l1_penalty
            ),
        )
    step(
        "int8",
        lambda d, cd, t, p, o: compress_steps.int8_step(c.int8, k, d, cd, t, p, o),
    )
    step(
        "precision",
        lambda d, cd, t, p, o: compress_steps.precision_step(
            c.int8, c.methods.precision, k, d, cd, t, p, o
        ),
    )
    return RunResult(config, out)


def compression_threads(n: int) -> None:
    """Run the steps after the teacher (students, pruning, int8) on torch's ``n`` threads, the
    teacher's: training the teacher leaves the count set so, and a teacher from the step
    cache (or an imported one) must give the same students as one trained in this run,
    not students trained on torch's default count."""
    import torch

    torch.set_num_threads(n)
