"""Where the pipeline's heavy loops run: in this process (``local``) or on Ray (``ray``).

An engine does three things the steps hand it: mine and featurize one view's candidates,
score candidates with the teacher, and fit a student epoch by epoch on validation NDCG (the
one loop of :mod:`slimrank.compression.fit`, on one worker here, data-parallel on Ray). The
local engine is the reference; :mod:`slimrank.pipeline.ray_engine` must give the same
candidates, features and teacher scores (float tolerance) and students of the same quality.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from slimrank.config import Config, require
from slimrank.errors import SlimrankError

if TYPE_CHECKING:
    import scipy.sparse as sp
    import torch

    from slimrank.compression.distill import DistillConfig
    from slimrank.compression.fit import FitConfig, Metric
    from slimrank.compression.lists import ListData
    from slimrank.ranking.candidates import Candidates
    from slimrank.ranking.features import CandidateFeatures, FeatureTables
    from slimrank.ranking.teacher import DCNv2
    from slimrank.retrieval.index import RetrievalIndex

ENGINES = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class EngineConfig(Config):
    """Which engine runs the pipeline and, for Ray, where and how wide.

    ``address``: a Ray cluster address (``"auto"`` joins the one on this machine); empty
    starts a private local instance, or uses the one this process already initialized.
    ``workers``: Ray Train workers for student distillation; 1 keeps the local loop.
    ``batch_users``: users per Ray Data batch in candidate mining and teacher scoring.
    """

    kind: str = "local"
    address: str = ""
    workers: int = 1
    batch_users: int = 256

    def __post_init__(self) -> None:
        require(self.kind in ENGINES, self, "kind", self.kind, f"one of {', '.join(ENGINES)}")
        require(self.workers >= 1, self, "workers", self.workers, "must be >= 1")
        require(self.batch_users >= 1, self, "batch_users", self.batch_users, "must be >= 1")
        require(
            self.kind == "ray" or (self.workers == 1 and not self.address),
            self,
            "kind",
            self.kind,
            "--ray-address and --ray-workers > 1 need the ray engine",
        )

    def cache_key(self) -> dict[str, Any]:
        """Return what makes the students' outputs differ from the local engine's.

        Mining and teacher scoring give the local engine's results, so those steps share the
        cache across engines; data-parallel training on several workers does not.
        """
        return {"train_workers": self.workers} if self.workers > 1 else {}


class Engine(Protocol):
    """The loops a pipeline step may hand to an engine."""

    def mine(
        self,
        tables: FeatureTables,
        user_vecs: np.ndarray,
        index: RetrievalIndex,
        users: np.ndarray,
        n: int,
        observed: sp.csr_matrix,
        truth: sp.csr_matrix,
    ) -> tuple[Candidates, CandidateFeatures, np.ndarray]:
        """Return the candidates of ``users``, their ``(U, N, F)`` features and labels."""
        ...

    def teacher_scores(self, model: DCNv2, feats: CandidateFeatures) -> np.ndarray:
        """Return the teacher's float32 ``(U, N)`` scores, ``-inf`` at pads."""
        ...

    def fit_student(
        self,
        student: torch.nn.Module,
        lists: ListData,
        loss: DistillConfig,
        config: FitConfig,
        metric: Metric,
    ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        """Return the student of the best validation epoch and every epoch's record."""
        ...


class LocalEngine:
    """Everything in this process: the reference the Ray engine is tested against."""

    def mine(
        self,
        tables: FeatureTables,
        user_vecs: np.ndarray,
        index: RetrievalIndex,
        users: np.ndarray,
        n: int,
        observed: sp.csr_matrix,
        truth: sp.csr_matrix,
    ) -> tuple[Candidates, CandidateFeatures, np.ndarray]:
        """Return the candidates of ``users``, their ``(U, N, F)`` features and labels."""
        return mine_batch(tables, user_vecs, index.search, users, n, observed, truth)

    def teacher_scores(self, model: DCNv2, feats: CandidateFeatures) -> np.ndarray:
        """Return the teacher's float32 ``(U, N)`` scores, ``-inf`` at pads."""
        from slimrank.ranking.teacher import teacher_scores

        return teacher_scores(model, feats)

    def fit_student(
        self,
        student: torch.nn.Module,
        lists: ListData,
        loss: DistillConfig,
        config: FitConfig,
        metric: Metric,
    ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        """Return the student of the best validation epoch and every epoch's record."""
        from slimrank.compression.fit import fit_on_valid

        return fit_on_valid(student, lists, loss, config, metric)


def mine_batch(
    tables: FeatureTables,
    user_vecs: np.ndarray,
    search: Any,
    users: np.ndarray,
    n: int,
    observed: sp.csr_matrix,
    truth: sp.csr_matrix,
) -> tuple[Candidates, CandidateFeatures, np.ndarray]:
    """Return ``users``' top-``n`` candidates (``observed`` excluded), features and labels."""
    from slimrank.ranking.candidates import label_candidates, mine_candidates
    from slimrank.ranking.features import candidate_features

    cands = mine_candidates(user_vecs, search, users, n, observed)
    return cands, candidate_features(tables, cands), label_candidates(cands, truth)


@contextlib.contextmanager
def open_engine(config: EngineConfig) -> Iterator[Engine]:
    """Yield the engine of ``config``; a Ray instance it started is shut down on exit."""
    if config.kind == "local":
        yield LocalEngine()
        return
    try:
        from slimrank.pipeline.ray_engine import RayEngine
    except ModuleNotFoundError as err:
        if err.name != "ray":
            raise
        raise SlimrankError("the ray engine needs ray: pip install 'slimrank[ray]'") from err
    with RayEngine.open(config) as engine:
        yield engine
