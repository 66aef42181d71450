"""The pipeline's artifacts: what each step hands the next, and the one place their files are named.

Every step of :data:`slimrank.pipeline.run.STEP_TABLE` turns input artifacts into one output
artifact, a type from this module. The runner loads a step's inputs with ``Type.load(dir)``
from the upstream steps' directories, and saves its output with ``artifact.save(dir)``; a
step never opens another step's files. ``Type.FILES`` is what ``save`` leaves in a step's
directory (checked before the directory is kept).

Most artifacts are values (arrays, models, records). The compression steps' outputs are ONNX
files that the quantizer and exporter write themselves, so those artifacts
(:class:`StepFiles` subclasses) are the step's own directory with typed accessors; their file
names are still this module's.

Arrays go to safetensors (several named arrays, a JSON string in the header for the rest) or
``.npy``; nothing here unpickles. The feature tables a bundle ships are saved by
:mod:`slimrank.ranking.feature_io`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp

from slimrank.bundle.formats import (
    read_npy,
    read_tensors,
    read_tensors_metadata,
    write_json,
    write_npy,
    write_tensors,
)
from slimrank.data.dataset import FeatureTable, Interactions, Split
from slimrank.evaluation.peers import observed_interactions, observed_times
from slimrank.ranking.candidates import Candidates
from slimrank.ranking.features import CandidateFeatures

if TYPE_CHECKING:
    from slimrank.ranking.features import FeatureTables
    from slimrank.ranking.mlp import MLPRanker
    from slimrank.ranking.teacher import DCNv2
    from slimrank.retrieval.index import RetrievalIndex
    from slimrank.retrieval.two_tower import TwoTower
    from slimrank.search.catalog import Catalog

_FIELDS = ("user", "item", "rating", "timestamp")


def save_feature_table(path: str | Path, table: FeatureTable) -> None:
    """Write a :class:`FeatureTable` as safetensors (cardinalities and vocab in the header)."""
    tensors: dict[str, np.ndarray] = {}
    for kind in ("categorical", "numeric", "multi_hot"):
        for name, values in getattr(table, kind).items():
            tensors[f"{kind}/{name}"] = np.ascontiguousarray(values)
    meta = {
        "n_rows": table.n_rows,
        "cardinality": {k: int(v) for k, v in table.cardinality.items()},
        "vocab": {k: [str(x) for x in v] for k, v in table.vocab.items()},
        "order": {
            kind: list(getattr(table, kind)) for kind in ("categorical", "numeric", "multi_hot")
        },
    }
    if not tensors:  # safetensors needs one tensor; an empty table still round-trips
        tensors["_empty"] = np.zeros(0, dtype=np.float32)
    write_tensors(path, tensors, {"feature_table": json.dumps(meta)})


def load_feature_table(path: str | Path) -> FeatureTable:
    """Return the :class:`FeatureTable` written by :func:`save_feature_table`."""
    meta = json.loads(read_tensors_metadata(path)["feature_table"])
    tensors = read_tensors(path)
    columns = {
        kind: {name: tensors[f"{kind}/{name}"] for name in names}
        for kind, names in meta["order"].items()
    }
    return FeatureTable(
        n_rows=int(meta["n_rows"]),
        categorical=columns["categorical"],
        cardinality=meta["cardinality"],
        numeric=columns["numeric"],
        multi_hot=columns["multi_hot"],
        vocab=meta["vocab"],
    )


def save_split(path: str | Path, split: Split) -> None:
    """Write the train / valid / test interactions of ``split`` as one safetensors file."""
    tensors = {
        f"{part}/{f}": np.ascontiguousarray(getattr(getattr(split, part), f))
        for part in ("train", "valid", "test")
        for f in _FIELDS
    }
    meta = {"n_users": split.n_users, "n_items": split.n_items}
    write_tensors(path, tensors, {"split": json.dumps(meta)})


def load_split(path: str | Path) -> Split:
    """Return the :class:`Split` written by :func:`save_split`."""
    meta = json.loads(read_tensors_metadata(path)["split"])
    t = read_tensors(path)
    parts = {
        part: Interactions(*(t[f"{part}/{f}"] for f in _FIELDS))
        for part in ("train", "valid", "test")
    }
    return Split(**parts, n_users=int(meta["n_users"]), n_items=int(meta["n_items"]))


def interactions_from_matrix(matrix: sp.csr_matrix) -> Interactions:
    """Return one interaction per non-zero of a binary ``(U, I)`` matrix (timestamps 0)."""
    m = sp.csr_matrix(matrix)
    user = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    item = m.indices.astype(np.int64)
    return Interactions(user, item, np.ones(len(user), np.float32), np.zeros(len(user), np.int64))


def save_view(
    path: str | Path,
    cands: Candidates,
    feats: CandidateFeatures,
    labels: np.ndarray,
) -> None:
    """Write candidates, their ``(U, N, F)`` features and ``(U, N)`` labels."""
    write_tensors(
        path,
        {
            "user": cands.user,
            "items": cands.items,
            "retrieval_score": cands.retrieval_score,
            "features": feats.values,
            "labels": labels.astype(np.float32),
        },
        {"names": json.dumps(list(feats.names))},
    )


def load_view(path: str | Path) -> tuple[Candidates, CandidateFeatures, np.ndarray]:
    """Return ``(candidates, features, labels)`` written by :func:`save_view`."""
    names = tuple(json.loads(read_tensors_metadata(path)["names"]))
    t = read_tensors(path)
    cands = Candidates(t["user"], t["items"], t["retrieval_score"])
    feats = CandidateFeatures(t["features"], names, cands.user, cands.items)
    return cands, feats, t["labels"]


# -- the names of the files in a step's directory: only this module spells them --------------

METRICS = "metrics.json"  # every evaluated step: {"valid": {...}, "test": {...}, ...}
RANKER = "model.onnx"  # a student step's ranker, taking raw candidate features
MODEL_INFO = "model.json"  # a student step's shape, cost and training record
STANDARDIZATION = "standardization.safetensors"  # the student's input mean and std
STUDENT = "student.safetensors"  # a student's standardized-input weights
SCORES = "scores.safetensors"  # the teacher's (U, N) scores of each view
TEACHER = "teacher"  # the teacher model's directory (teacher.safetensors, teacher.json)
TEACHER_VERSION = "teacher_version.txt"  # an imported teacher's version id
TWO_TOWER = "model"  # the two-tower model's directory
INDEX = "index"  # the FAISS index's directory
CATALOG = "catalog"  # the search catalog's directory
EMBEDDINGS = "embeddings.safetensors"
SERVING_TABLES = "serving_tables.safetensors"  # the test view's feature tables
SERVING_LAYOUT = "serving_layout.json"
SEEDS = "seeds.json"
GATE = "gate.json"
INT8_RANKER = "ranker.int8.onnx"  # the gated int8 ranker (also each mode's, in its directory)
REJECTED_INT8 = "rejected.int8.onnx"  # an ungated full-int8 copy, for the report only
PRECISION = "precision.json"
PRECISION_RANKER = "ranker.onnx"  # the precision search's chosen plan
FP16 = "fp16"  # the all-fp16 ranker's directory
DATA_FILES = (
    "split.safetensors",
    "users.npy",
    "items.npy",
    "user_features.safetensors",
    "item_features.safetensors",
    "data.json",
)
VIEWS = ("train", "valid", "test")


def save_metrics(step_dir: str | Path, metrics: dict) -> None:
    """Write a step's evaluation record."""
    write_json(Path(step_dir) / METRICS, metrics)


def load_metrics(step_dir: str | Path) -> dict:
    """Return a step's evaluation record."""
    return json.loads((Path(step_dir) / METRICS).read_text())


def ranker_path(step_dir: str | Path) -> Path:
    """Return the ONNX ranker a student step writes in ``step_dir``."""
    return Path(step_dir) / RANKER


def load_model_info(step_dir: str | Path) -> dict:
    """Return a student step's ``model.json`` (hidden sizes, non-zero parameters, FLOPs...)."""
    return json.loads((Path(step_dir) / MODEL_INFO).read_text())


def save_standardization(step_dir: str | Path, mean: np.ndarray, std: np.ndarray) -> None:
    """Write the ``(F,)`` mean and std a student's inputs are standardized with."""
    write_tensors(Path(step_dir) / STANDARDIZATION, {"mean": mean, "std": std})


def load_standardization(step_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``(F,)`` mean and std a student step standardized its inputs with."""
    t = read_tensors(Path(step_dir) / STANDARDIZATION)
    return t["mean"], t["std"]


# -- the artifact types ------------------------------------------------------------------------


class Artifact:
    """What one step hands the next: saved into, and loaded from, a step's directory."""

    FILES: ClassVar[tuple[str, ...]] = ()

    def save(self, directory: Path) -> None:
        """Write the artifact's :attr:`FILES` into ``directory``."""
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Return the artifact :meth:`save` wrote into ``directory``."""
        raise NotImplementedError

    @classmethod
    def missing(cls, directory: Path) -> list[str]:
        """Return the artifact's files that ``directory`` lacks."""
        return [name for name in cls.FILES if not (Path(directory) / name).exists()]


@dataclasses.dataclass(frozen=True)
class DataArtifact(Artifact):
    """The split with its external ids and raw side-feature tables."""

    FILES: ClassVar[tuple[str, ...]] = DATA_FILES

    split: Split
    user_ids: np.ndarray  # (U,) str
    item_ids: np.ndarray  # (I,) str
    user_features: FeatureTable
    item_features: FeatureTable

    def truth(self, view: str) -> sp.csr_matrix:
        """Return the relevant items of ``view`` ("valid" or "test"), ``(U, I)``."""
        return self.split.valid_matrix() if view == "valid" else self.split.test_matrix()

    def seen(self, view: str) -> sp.csr_matrix:
        """Return what users already have in ``view``: train, or train plus valid.

        It is what every system may read when scoring ``view``
        (:func:`~slimrank.evaluation.peers.observed_interactions`, the peers' input too): the
        view's user vectors, feature tables and exclusions are built from it.
        """
        return observed_interactions(self.split, view)

    def seen_times(self, view: str) -> sp.csr_matrix:
        """Return the latest timestamp of each (user, item) users already have in ``view``."""
        return observed_times(self.split, view)

    def save(self, directory: Path) -> None:
        split_f, users_f, items_f, user_feat_f, item_feat_f, info_f = DATA_FILES
        save_split(directory / split_f, self.split)
        write_npy(directory / users_f, np.asarray(self.user_ids).astype(str))
        write_npy(directory / items_f, np.asarray(self.item_ids).astype(str))
        save_feature_table(directory / user_feat_f, self.user_features)
        save_feature_table(directory / item_feat_f, self.item_features)
        split = self.split
        write_json(
            directory / info_f,
            {
                "n_users": split.n_users,
                "n_items": split.n_items,
                "train": len(split.train),
                "valid": len(split.valid),
                "test": len(split.test),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        directory = Path(directory)
        split_f, users_f, items_f, user_feat_f, item_feat_f, _ = DATA_FILES
        return cls(
            split=load_split(directory / split_f),
            user_ids=read_npy(directory / users_f),
            item_ids=read_npy(directory / items_f),
            user_features=load_feature_table(directory / user_feat_f),
            item_features=load_feature_table(directory / item_feat_f),
        )


@dataclasses.dataclass(frozen=True)
class CatalogArtifact(Artifact):
    """The search catalog of the data step's items (same rows, same order)."""

    FILES: ClassVar[tuple[str, ...]] = (CATALOG, METRICS)

    catalog: Catalog
    metrics: dict[str, Any]

    def save(self, directory: Path) -> None:
        from slimrank.search.catalog import save_catalog

        save_catalog(directory / CATALOG, self.catalog)
        save_metrics(directory, self.metrics)

    @classmethod
    def load(cls, directory: Path) -> Self:
        from slimrank.search.catalog import load_catalog_dir

        directory = Path(directory)
        return cls(load_catalog_dir(directory / CATALOG), load_metrics(directory))


@dataclasses.dataclass(frozen=True)
class TwoTowerArtifact(Artifact):
    """The trained two-tower model and its full-ranking metrics."""

    FILES: ClassVar[tuple[str, ...]] = (TWO_TOWER, METRICS)

    model: TwoTower
    metrics: dict[str, Any]

    def save(self, directory: Path) -> None:
        from slimrank.retrieval.two_tower import save_model

        save_model(self.model, directory / TWO_TOWER)
        save_metrics(directory, self.metrics)

    @classmethod
    def load(cls, directory: Path) -> Self:
        from slimrank.retrieval.two_tower import load_model

        directory = Path(directory)
        return cls(load_model(directory / TWO_TOWER), load_metrics(directory))


@dataclasses.dataclass(frozen=True)
class EmbeddingsArtifact(Artifact):
    """Item vectors, user vectors of each view, and the training items' history/target folds."""

    FILES: ClassVar[tuple[str, ...]] = (EMBEDDINGS,)

    item: np.ndarray  # (I, d)
    user: dict[str, np.ndarray]  # view -> (U, d): "fold<i>", "valid", "test"
    history: list[sp.csr_matrix]  # per fold, (U, I) history part of the training items
    target: list[sp.csr_matrix]  # per fold, (U, I) target part
    # Per fold, (I, d) item vectors of the fold's own two-tower (refit), else empty.
    fold_item: list[np.ndarray] = dataclasses.field(default_factory=list)

    def save(self, directory: Path) -> None:
        tensors: dict[str, np.ndarray] = {"item": self.item}
        for i, (history, target) in enumerate(zip(self.history, self.target, strict=True)):
            for name, m in ((f"history{i}", history), (f"target{i}", target)):
                tensors[f"{name}/indptr"] = m.indptr.astype(np.int64)
                tensors[f"{name}/indices"] = m.indices.astype(np.int64)
        for name, vecs in self.user.items():
            tensors[f"user/{name}"] = vecs
        for i, vecs in enumerate(self.fold_item):
            tensors[f"item/fold{i}"] = vecs
        write_tensors(directory / EMBEDDINGS, tensors)

    @classmethod
    def load(cls, directory: Path) -> Self:
        directory = Path(directory)
        t = read_tensors(directory / EMBEDDINGS)
        n_items = len(t["item"])

        def csr(name: str) -> sp.csr_matrix:
            idx, indptr = t[f"{name}/indices"], t[f"{name}/indptr"]
            data = np.ones(len(idx), dtype=np.float32)
            return sp.csr_matrix((data, idx, indptr), shape=(len(indptr) - 1, n_items))

        user = {k.removeprefix("user/"): v for k, v in t.items() if k.startswith("user/")}
        folds = sum(1 for k in t if k.startswith("history") and k.endswith("/indptr"))
        history = [csr(f"history{i}") for i in range(folds)]
        fold_item = [t[f"item/fold{i}"] for i in range(folds) if f"item/fold{i}" in t]
        targets = [csr(f"target{i}") for i in range(folds)]
        return cls(t["item"], user, history, targets, fold_item)


@dataclasses.dataclass(frozen=True)
class IndexArtifact(Artifact):
    """The FAISS index over the item vectors (its ``search`` is a ``SearchFn``)."""

    FILES: ClassVar[tuple[str, ...]] = (INDEX,)

    index: RetrievalIndex

    def save(self, directory: Path) -> None:
        from slimrank.retrieval.index_io import save_index

        save_index(self.index, directory / INDEX)

    @classmethod
    def load(cls, directory: Path) -> Self:
        from slimrank.retrieval.index_io import load_index

        directory = Path(directory)
        return cls(load_index(directory / INDEX, mmap=False))


# One view's mined candidates, their (U, N, F) features and (U, N) labels.
View = tuple[Candidates, CandidateFeatures, np.ndarray]


@dataclasses.dataclass(frozen=True)
class CandidatesArtifact(Artifact):
    """The mined, featurized and labelled candidates of each view, and the serving tables.

    ``serving_tables`` (the test view's feature tables: what a server knows) are written by
    :meth:`save` and not read back by :meth:`load`: no step reads them, and a bundle ships
    the file as it is (:meth:`serving_files`).
    """

    FILES: ClassVar[tuple[str, ...]] = (
        *(f"{v}.safetensors" for v in VIEWS),
        SERVING_TABLES,
        SERVING_LAYOUT,
        METRICS,
    )

    views: dict[str, View]
    metrics: dict[str, Any]
    serving_tables: FeatureTables | None = None

    def save(self, directory: Path) -> None:
        from slimrank.ranking.feature_io import save_tables

        if self.serving_tables is None:
            raise ValueError("candidates: no serving tables to save")
        for view in VIEWS:
            save_view(directory / f"{view}.safetensors", *self.views[view])
        layout = save_tables(directory / SERVING_TABLES, self.serving_tables)
        write_json(directory / SERVING_LAYOUT, layout)
        save_metrics(directory, self.metrics)

    @classmethod
    def load(cls, directory: Path) -> Self:
        directory = Path(directory)
        views = {view: load_view(directory / f"{view}.safetensors") for view in VIEWS}
        return cls(views, load_metrics(directory))

    @staticmethod
    def load_one(directory: Path, view: str) -> View:
        """Return one view (``train``, ``valid`` or ``test``) of a candidates directory."""
        return load_view(Path(directory) / f"{view}.safetensors")

    @staticmethod
    def serving_files(directory: Path) -> tuple[Path, dict[str, Any]]:
        """Return the serving tables' file in a candidates directory and their layout."""
        directory = Path(directory)
        return directory / SERVING_TABLES, json.loads((directory / SERVING_LAYOUT).read_text())


@dataclasses.dataclass(frozen=True)
class TeacherArtifact(Artifact):
    """The DCN-v2 teacher, the feature names it expects, and its scores of each view.

    ``version`` is set for a teacher imported from a bundle (it keeps its id); a teacher
    trained here is named by its step digest.
    """

    FILES: ClassVar[tuple[str, ...]] = (TEACHER, SCORES, METRICS)

    model: DCNv2
    feature_names: tuple[str, ...]
    extra: dict[str, Any]  # kept in teacher.json: the training record
    scores: dict[str, np.ndarray]  # view -> (U, N), -inf at pads
    metrics: dict[str, Any]
    version: str | None = None

    def save(self, directory: Path) -> None:
        from slimrank.ranking.teacher import save_teacher

        save_teacher(self.model, directory / TEACHER, self.feature_names, self.extra)
        write_tensors(directory / SCORES, self.scores)
        save_metrics(directory, self.metrics)
        if self.version is not None:
            (directory / TEACHER_VERSION).write_text(self.version + "\n")

    @classmethod
    def load(cls, directory: Path) -> Self:
        directory = Path(directory)
        version = imported_version(directory)
        teacher = TeacherModel.load(directory / TEACHER, version or "")
        return cls(
            teacher.model,
            teacher.feature_names,
            teacher.extra,
            read_tensors(directory / SCORES),
            load_metrics(directory),
            version,
        )

    @staticmethod
    def load_scores(directory: Path) -> dict[str, np.ndarray]:
        """Return only the teacher's ``(U, N)`` scores of each view (``-inf`` at pads)."""
        return read_tensors(Path(directory) / SCORES)

    @staticmethod
    def model_dir(directory: Path) -> Path:
        """The teacher model's directory in a teacher step's (what a bundle ships)."""
        return Path(directory) / TEACHER


@dataclasses.dataclass(frozen=True)
class TeacherModel:
    """A trained teacher to reuse (a bundle's): the model, its features, record and version."""

    model: DCNv2
    feature_names: tuple[str, ...]
    extra: dict[str, Any]
    version: str

    @classmethod
    def load(cls, directory: Path, version: str) -> TeacherModel:
        """Return the teacher model saved in ``directory`` (a bundle's ``teacher/``)."""
        from slimrank.ranking.teacher import CONFIG_FILE, load_teacher

        model, names = load_teacher(directory)
        extra = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("extra", {})
        return cls(model, names, extra, version)


def imported_version(teacher_dir: Path) -> str | None:
    """Return the version id of an imported teacher's step directory, else None."""
    marker = Path(teacher_dir) / TEACHER_VERSION
    return marker.read_text().strip() if marker.exists() else None


@dataclasses.dataclass(frozen=True)
class StepFiles(Artifact):
    """An artifact the step writes into its own directory: that directory, typed accessors.

    :meth:`save` copies it when the runner keeps it elsewhere, and is a no-op in place.
    """

    directory: Path

    def save(self, directory: Path) -> None:
        if Path(directory).resolve() != Path(self.directory).resolve():
            shutil.copytree(self.directory, directory, dirs_exist_ok=True)

    @classmethod
    def load(cls, directory: Path) -> Self:
        return cls(Path(directory))

    @property
    def metrics(self) -> dict[str, Any]:
        """The step's evaluation record."""
        return load_metrics(self.directory)


@dataclasses.dataclass(frozen=True)
class StudentArtifact(StepFiles):
    """A student ranker: standardized-input weights, standardization, ONNX for raw features."""

    FILES: ClassVar[tuple[str, ...]] = (METRICS, RANKER, MODEL_INFO, STANDARDIZATION, STUDENT)

    @property
    def ranker(self) -> Path:
        """The ONNX ranker, taking raw candidate features."""
        return ranker_path(self.directory)

    @property
    def info(self) -> dict[str, Any]:
        """Hidden sizes, non-zero parameters, FLOPs and the training record."""
        return load_model_info(self.directory)

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(F,)`` mean and std the student's inputs are standardized with."""
        return load_standardization(self.directory)

    def model(self) -> MLPRanker:
        """The student on standardized inputs (torch)."""
        from slimrank.compression.export import load_mlp

        return load_mlp(self.directory / STUDENT)

    @staticmethod
    def weights_path(directory: Path) -> Path:
        """Where a student step writes the standardized-input weights."""
        return Path(directory) / STUDENT

    @staticmethod
    def info_path(directory: Path) -> Path:
        """Where a student step writes its ``model.json``."""
        return Path(directory) / MODEL_INFO


@dataclasses.dataclass(frozen=True)
class SeedsArtifact(StepFiles):
    """The distilled student retrained once per extra seed: each one's metrics and ranker."""

    FILES: ClassVar[tuple[str, ...]] = (SEEDS,)

    @property
    def records(self) -> dict[str, Any]:
        """``{seed: {"valid": ..., "test": ...}}``."""
        return json.loads((self.directory / SEEDS).read_text())

    @staticmethod
    def seed_dir(directory: Path, seed: int) -> Path:
        """The directory of one seed's student (a :class:`StudentArtifact`'s files)."""
        return Path(directory) / f"seed{seed}"

    @staticmethod
    def save_records(directory: Path, records: dict[str, Any]) -> None:
        write_json(Path(directory) / SEEDS, records)


@dataclasses.dataclass(frozen=True)
class Int8Artifact(StepFiles):
    """The int8 modes through the gate, the chosen ranker (or a rejected copy) and why."""

    FILES: ClassVar[tuple[str, ...]] = (GATE, METRICS)

    @property
    def gate(self) -> dict[str, Any]:
        """The gate's summary: accepted, mode, each mode's decision, the CPU."""
        return json.loads((self.directory / GATE).read_text())

    @property
    def ranker(self) -> Path:
        """The served int8 ranker, or the rejected copy when no mode passed."""
        return self.directory / self.gate["model"]

    @staticmethod
    def mode_dir(directory: Path, mode: str) -> Path:
        """Where one mode is quantized and gated."""
        return Path(directory) / mode

    @staticmethod
    def save_gate(directory: Path, summary: dict[str, Any]) -> None:
        write_json(Path(directory) / GATE, summary)


@dataclasses.dataclass(frozen=True)
class PrecisionArtifact(StepFiles):
    """The all-fp16 ranker and the per-layer precision search's chosen plan."""

    FILES: ClassVar[tuple[str, ...]] = (
        PRECISION,
        PRECISION_RANKER,
        METRICS,
        f"{FP16}/{RANKER}",
        f"{FP16}/{METRICS}",
    )

    @property
    def summary(self) -> dict[str, Any]:
        """Every plan tried, the chosen one, and the CPU it was timed on."""
        return json.loads((self.directory / PRECISION).read_text())

    @property
    def ranker(self) -> Path:
        """The chosen plan's ranker (the all-fp32 plan when none passed)."""
        return self.directory / PRECISION_RANKER

    @property
    def fp16(self) -> Path:
        """The directory of the all-fp16 ranker (its ranker and metrics)."""
        return self.directory / FP16

    @staticmethod
    def save_summary(directory: Path, summary: dict[str, Any]) -> None:
        write_json(Path(directory) / PRECISION, summary)


ARTIFACTS = (
    DataArtifact,
    CatalogArtifact,
    TwoTowerArtifact,
    EmbeddingsArtifact,
    IndexArtifact,
    CandidatesArtifact,
    TeacherArtifact,
    StudentArtifact,
    SeedsArtifact,
    Int8Artifact,
    PrecisionArtifact,
)
