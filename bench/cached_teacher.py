"""The cached teacher step of ``slimrank pipeline``, read for benches that try another teacher.

``bench/teacher_variants.py`` and ``bench/teacher_losses.py`` both compare a new teacher with
the cached one on the validation view, paired over users; this reads what they share: the
training lists, the validation lists and truth, and the cached teacher's validation ranking.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimrank.evaluation.paired import PerUser
from slimrank.pipeline.artifacts import (
    CandidatesArtifact,
    DataArtifact,
    TeacherArtifact,
)
from slimrank.pipeline.config import load_config, resolve_config
from slimrank.pipeline.run import cached_step_paths
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
