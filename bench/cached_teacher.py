"""The cached teacher step of ``slimrank pipeline``, read for benches that try another teacher.

``bench/teacher_variants.py``, ``bench/teacher_losses.py`` and ``bench/teacher_search.py``
compare a new teacher with the cached one on the validation view, paired over users; this
reads what they share (the training lists, the validation lists and truth, the cached
teacher's validation ranking), trains a teacher and compares it (:func:`train_against_cached`),
writes a row of their results tables (:func:`table_row`), and leaves columns out
(:func:`drop_columns`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimrank.evaluation.paired import PairedInterval, PerUser, paired_bootstrap
from slimrank.pipeline.artifacts import (
    CandidatesArtifact,
    DataArtifact,
    TeacherArtifact,
)
from slimrank.pipeline.config import load_config, resolve_config
from slimrank.pipeline.run import cached_step_paths
from slimrank.ranking.features import CandidateFeatures
from slimrank.ranking.pipeline_eval import pipeline_per_user


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
    """What a teacher bench reads from the step cache of one pipeline config."""

    config: Any  # the PipelineConfig
    data: DataArtifact
    feats: Any  # CandidateFeatures of the training lists
    labels: np.ndarray
    v_cands: Any  # Candidates of the validation view
    v_feats: Any
    v_labels: np.ndarray
    truth: Any  # the validation truth
    scores: np.ndarray  # the cached teacher's validation scores, float64
    base: PerUser  # its pipeline NDCG@k per validation user

    @property
    def k(self) -> int:
        return self.config.k


def load_cached_teacher(config_name: str) -> CachedTeacher | None:
    """Read the cached steps up to the teacher; None (with a message) when it has not run."""
    config = load_config(resolve_config(config_name))
    paths = cached_step_paths(config)
    cand_dir, teacher_dir = paths["candidates"], paths["teacher"]
    if not (teacher_dir / "metrics.json").exists():
        print(f"{teacher_dir}: no teacher step; run slimrank pipeline --config {config_name}")
        return None
    data = DataArtifact.load(paths["data"])
    _, feats, labels = CandidatesArtifact.load_one(cand_dir, "train")
    v_cands, v_feats, v_labels = CandidatesArtifact.load_one(cand_dir, "valid")
    truth = data.truth("valid")
    scores = TeacherArtifact.load_scores(teacher_dir)["valid"].astype(np.float64)
    base = pipeline_per_user(v_cands, scores, truth, config.k)
    return CachedTeacher(
        config, data, feats, labels, v_cands, v_feats, v_labels, truth, scores, base
    )


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """One teacher trained again and compared with the cached one on the validation view."""

    best_epoch: int
    scores: np.ndarray  # its validation scores, float64
    per: PerUser  # its pipeline NDCG@k per validation user
    ci: PairedInterval  # it minus the cached teacher, paired over users
    curve: list[float]  # validation NDCG@k by epoch (0 = untrained)
    minutes: float  # training and scoring


def train_against_cached(
    cached: CachedTeacher,
    teacher: Any,
    feats: Any = None,
    v_feats: Any = None,
    seed: int | None = None,
) -> TeacherRun:
    """Train the pipeline's teacher with the step config ``teacher`` on the cached training
    lists (or ``feats`` / ``v_feats``: the same lists with other columns), early-stopped on
    validation as the pipeline's is, and compare it with the cached teacher."""
    from slimrank.pipeline.steps import train_pipeline_teacher
    from slimrank.ranking.teacher import teacher_scores

    feats = cached.feats if feats is None else feats
    v_feats = cached.v_feats if v_feats is None else v_feats
    k = cached.k
    started = time.perf_counter()
    result = train_pipeline_teacher(
        teacher, k, cached.data, (feats, cached.labels), (cached.v_cands, v_feats), seed=seed
    )
    scores = teacher_scores(result.model, v_feats).astype(np.float64)
    per = pipeline_per_user(cached.v_cands, scores, cached.truth, k)
    return TeacherRun(
        best_epoch=result.best_epoch,
        scores=scores,
        per=per,
        ci=paired_bootstrap(per, cached.base),
        curve=[h[f"valid_ndcg@{k}"] for h in result.history],
        minutes=(time.perf_counter() - started) / 60,
    )


def table_row(name: str, run: TeacherRun) -> str:
    """A results table row: name, chosen epoch, valid NDCG, minus the cached teacher [95% CI],
    NDCG by epoch, minutes."""
    ci = run.ci
    diff = f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"
    by_epoch = ", ".join(f"{v:.4f}" for v in run.curve)
    return (
        f"| {name} | {run.best_epoch} | {run.per.mean:.4f} | {diff} | {by_epoch} "
        f"| {run.minutes:.1f} |"
    )


def drop_columns(feats: CandidateFeatures, prefixes: list[str]) -> CandidateFeatures:
    """``feats`` without the columns whose name starts with one of ``prefixes``."""
    keep = [i for i, n in enumerate(feats.names) if not n.startswith(tuple(prefixes))]
    names = tuple(feats.names[i] for i in keep)
    return CandidateFeatures(feats.values[..., keep], names, feats.user, feats.items)
