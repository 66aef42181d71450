"""The Ray engine: Ray Data batch maps for mining and teacher scoring, Ray Train for students.

Mining and scoring ship their read-only inputs once through the object store (``ray.put``)
and map user batches with Ray Data; each batch runs the local engine's own functions, so
results equal the local engine's up to float summation order. FAISS indexes do not pickle:
they travel as ``faiss.serialize_index`` bytes and are rebuilt in each batch task. Students with
``workers > 1`` train data-parallel under ``ray.train.torch.TorchTrainer`` (DDP over gloo):
every global batch of the local loop is split across the workers, so a worker count changes
the arithmetic, not the recipe. Checkpoints go to a temporary local directory, so multi-node
training needs ``RunConfig.storage_path`` on shared storage (not wired yet).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import ray

from slimrank.pipeline.engine import EngineConfig, LocalEngine, mine_batch
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import CandidateFeatures

if TYPE_CHECKING:
    import scipy.sparse as sp
    import torch

    from slimrank.compression.distill import DistillConfig
    from slimrank.compression.fit import FitConfig, Metric
    from slimrank.compression.lists import ListData
    from slimrank.ranking.features import FeatureTables
    from slimrank.ranking.teacher import DCNv2
    from slimrank.retrieval.index import RetrievalIndex

log = logging.getLogger(__name__)

_STUDENT_FILE = "student.safetensors"
_HISTORY_FILE = "history.json"


@dataclasses.dataclass(frozen=True)
class ShippedIndex:
    """A :class:`RetrievalIndex` as picklable parts: FAISS bytes, id map, config, params."""

    faiss_bytes: np.ndarray  # (S,) uint8, faiss.serialize_index
    item_ids: np.ndarray  # (I,)
    config: dict[str, Any]
    factory_string: str
    params: dict[str, float]
    mips_norm: float | None = None

    @classmethod
    def of(cls, index: RetrievalIndex) -> ShippedIndex:
        return cls(
            faiss.serialize_index(index.faiss_index),
            np.asarray(index.item_ids),
            index.config.to_dict(),
            index.factory_string,
            dict(index.params),
            index.mips_norm,
        )

    def load(self) -> RetrievalIndex:
        """Return the index rebuilt from the bytes, with its tuned search parameters."""
        from slimrank.retrieval.index import IndexConfig, RetrievalIndex

        faiss_index = faiss.deserialize_index(self.faiss_bytes)
        config = IndexConfig.from_dict(self.config)
        return RetrievalIndex(
            faiss_index,
            self.item_ids,
            config,
            self.factory_string,
            self.params,
            mips_norm=self.mips_norm,
        )


@dataclasses.dataclass(frozen=True)
class MiningInputs:
    """What every mining batch reads: the view's tables, user vectors, index and matrices."""

    tables: FeatureTables
    user_vecs: np.ndarray  # (n_users, d)
    index: ShippedIndex
    users: np.ndarray  # (U,) the users to mine, in output order
    n: int
    observed: sp.csr_matrix  # (n_users, n_items) excluded and featurized from
    truth: sp.csr_matrix  # (n_users, n_items) labels


def _mine_batch(batch: dict[str, np.ndarray], shared: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task: candidates, features and labels of a batch of row positions.

    The index is rebuilt from its bytes per batch (a copy of the codes, small next to the
    batch's searches); a task, unlike an actor pool, reuses Ray's warm worker processes.
    """
    p: MiningInputs = ray.get(shared["inputs"])
    rows = np.asarray(batch["id"], dtype=np.int64)  # (B,) positions in p.users
    search = p.index.load().search
    cands, feats, labels = mine_batch(
        p.tables, p.user_vecs, search, p.users[rows], p.n, p.observed, p.truth
    )
    return {
        "id": rows,
        "items": cands.items,  # (B, N)
        "retrieval_score": cands.retrieval_score,  # (B, N)
        "features": feats.values,  # (B, N, F)
        "labels": labels,  # (B, N)
    }


def _score_batch(batch: dict[str, np.ndarray], shared: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task: the teacher's scores of a batch of row positions."""
    from slimrank.ranking.teacher import teacher_scores

    p = ray.get(shared["inputs"])
    rows = np.asarray(batch["id"], dtype=np.int64)  # (B,)
    feats = CandidateFeatures(p["values"][rows], p["names"], p["user"][rows], p["items"][rows])
    return {"id": rows, "scores": teacher_scores(p["model"], feats)}


def _gather(ds: ray.data.Dataset, n_rows: int) -> dict[str, np.ndarray]:
    """Return the dataset's columns concatenated and put back in row (``id``) order."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(np.asarray(values))
    out = {name: np.concatenate(values) for name, values in parts.items()}
    order = np.argsort(out["id"], kind="stable")
    if not np.array_equal(out["id"][order], np.arange(n_rows)):
        raise RuntimeError(f"Ray Data returned rows {sorted(out['id'])[:5]}..., not 0..{n_rows}")
    return {name: values[order] for name, values in out.items()}


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker: :func:`~slimrank.compression.fit.fit_epochs`, each global batch split
    over the workers (DDP averages the gradients; the loss sums are all-reduced)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from slimrank.bundle.formats import write_tensors
    from slimrank.compression.fit import Shard, fit_epochs

    p = ray.get(cfg["inputs"]["payload"])
    ctx = ray.train.get_context()
    shard = Shard(ctx.get_world_rank(), ctx.get_world_size())
    model = ray.train.torch.prepare_model(copy.deepcopy(p["student"]), move_to_device=False)
    core = model.module if hasattr(model, "module") else model

    def reduce(total: float, batches: int) -> tuple[float, int]:
        sums = torch.tensor([total, float(batches)], dtype=torch.float64)
        if shard.world > 1:
            dist.all_reduce(sums)
        return float(sums[0]), int(sums[1])

    result = fit_epochs(
        model,
        p["lists"],
        p["loss"],
        p["config"],
        p["metric"],
        shard=shard,
        core=core,
        reduce=reduce,
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if shard.rank == 0:
            write_tensors(Path(tmp) / _STUDENT_FILE, result.state)
            (Path(tmp) / _HISTORY_FILE).write_text(json.dumps(result.history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"best_valid": result.best_metric}, checkpoint=checkpoint)


class RayEngine:
    """Mining and teacher scoring on Ray Data; students on Ray Train when ``workers > 1``."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._local = LocalEngine()

    @classmethod
    @contextlib.contextmanager
    def open(cls, config: EngineConfig) -> Iterator[RayEngine]:
        """Yield an engine on Ray, starting (and on exit stopping) Ray unless already running."""
        started = not ray.is_initialized()
        if started:
            ray.init(address=config.address or None, include_dashboard=False)
        else:
            log.info("using the Ray instance this process already initialized")
        try:
            yield cls(config)
        finally:
            if started:
                ray.shutdown()

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
        users = np.asarray(users, dtype=np.int64)
        if len(users) == 0:
            return self._local.mine(tables, user_vecs, index, users, n, observed, truth)
        inputs = MiningInputs(tables, user_vecs, ShippedIndex.of(index), users, n, observed, truth)
        ds = ray.data.range(len(users)).map_batches(
            _mine_batch,
            batch_size=self.config.batch_users,
            batch_format="numpy",
            fn_kwargs={"shared": {"inputs": ray.put(inputs)}},
        )
        out = _gather(ds, len(users))
        cands = Candidates(users, out["items"], out["retrieval_score"])
        feats = CandidateFeatures(
            out["features"].astype(np.float32), tables.feature_names, users.copy(), cands.items
        )
        return cands, feats, out["labels"].astype(np.float32)

    def teacher_scores(self, model: DCNv2, feats: CandidateFeatures) -> np.ndarray:
        """Return the teacher's float32 ``(U, N)`` scores, ``-inf`` at pads."""
        if len(feats) == 0:
            return self._local.teacher_scores(model, feats)
        payload = {
            "model": model,
            "values": feats.values,
            "names": feats.names,
            "user": feats.user,
            "items": feats.items,
        }
        ds = ray.data.range(len(feats)).map_batches(
            _score_batch,
            batch_size=self.config.batch_users,
            batch_format="numpy",
            fn_kwargs={"shared": {"inputs": ray.put(payload)}},
        )
        return _gather(ds, len(feats))["scores"].astype(np.float32)

    def fit_student(
        self,
        student: torch.nn.Module,
        lists: ListData,
        loss: DistillConfig,
        config: FitConfig,
        metric: Metric,
    ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        """Return the student of the best validation epoch and every epoch's record."""
        if self.config.workers == 1:
            return self._local.fit_student(student, lists, loss, config, metric)
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from slimrank.bundle.formats import read_tensors

        payload = {
            "student": student,
            "lists": lists,
            "loss": loss,
            "config": config,
            "metric": metric,
        }
        with tempfile.TemporaryDirectory(prefix="slimrank-ray-train-") as storage:
            trainer = TorchTrainer(
                _train_loop,
                train_loop_config={"inputs": {"payload": ray.put(payload)}},
                scaling_config=ScalingConfig(num_workers=self.config.workers, use_gpu=False),
                run_config=RunConfig(name="student", storage_path=storage),
            )
            result = trainer.fit()
            if result.checkpoint is None:
                raise RuntimeError("Ray Train finished without the student's checkpoint")
            with result.checkpoint.as_directory() as directory:
                state = read_tensors(Path(directory) / _STUDENT_FILE, framework="pt")
                history = json.loads((Path(directory) / _HISTORY_FILE).read_text())
        model = copy.deepcopy(student)
        model.load_state_dict(state)
        return model.eval(), history
