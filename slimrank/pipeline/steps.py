"""The offline steps up to the teacher; each writes its outputs into the directory it is given.

Order and inputs (each step's cache key is its config plus the digests of these inputs)::

    data -> two_tower -> embeddings -> index -> candidates -> teacher
         -> student_plain, student_distill, student_pseudo, student_seeds
         -> student_pruned, pruned_taylor, pruned_l1 -> int8, precision   (compress_steps)

``embeddings`` holds the user views: ``fold<i>`` (pools the history fold ``i`` of the training
items; training candidates are mined with it), ``valid`` (pools the training items) and
``test`` (training and validation items: what a server knows). Every ranker variant is
evaluated with the pipeline protocol (retrieve ``n``, rank, top ``k``) on the validation view
(selection, the gate) and the test view (reported). Loaders (``load_*``) read a step's
directory back; the names of a step's own files are :mod:`slimrank.pipeline.artifacts`'.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from slimrank.bundle.formats import read_npy, read_tensors, write_json, write_npy, write_tensors
from slimrank.data.dataset import Dataset, FeatureTable, Split, load_dataset, split_random
from slimrank.data.logs import load_logs
from slimrank.evaluation.peers import observed_interactions
from slimrank.pipeline import artifacts
from slimrank.pipeline.config import (
    SOURCES_SYNTHETIC,
    CandidateConfig,
    DataConfig,
    TeacherStepConfig,
    TwoTowerStepConfig,
)
from slimrank.pipeline.engine import LocalEngine
from slimrank.pipeline.synthetic import synthetic_dataset
from slimrank.ranking.candidates import Candidates, split_history
from slimrank.ranking.feature_io import save_tables
from slimrank.ranking.features import CandidateFeatures, FeatureTables, build_feature_tables
from slimrank.ranking.histories import latest_times
from slimrank.ranking.pipeline_eval import pipeline_metrics
from slimrank.search.build import TextIndexConfig

if TYPE_CHECKING:
    from slimrank.pipeline.engine import Engine
    from slimrank.retrieval.index import IndexConfig, RetrievalIndex
    from slimrank.retrieval.train import TrainConfig as TwoTowerTrainConfig
    from slimrank.retrieval.two_tower_config import TwoTowerConfig

log = logging.getLogger(__name__)

VIEWS = ("train", "valid", "test")
_CANDS = ("user", "items", "retrieval_score")


# -- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataArtifacts:
    """The split with its external ids and raw side-feature tables."""

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
        parts = [self.split.train] if view == "valid" else [self.split.train, self.split.valid]
        shape = (self.split.n_users, self.split.n_items)
        return latest_times(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("user", "item", "timestamp")
            ),
            shape,
        )


def write_data(out: Path, data: DataArtifacts) -> None:
    """Write the data step's files."""
    artifacts.save_split(out / "split.safetensors", data.split)
    write_npy(out / "users.npy", np.asarray(data.user_ids).astype(str))
    write_npy(out / "items.npy", np.asarray(data.item_ids).astype(str))
    artifacts.save_feature_table(out / "user_features.safetensors", data.user_features)
    artifacts.save_feature_table(out / "item_features.safetensors", data.item_features)
    split = data.split
    write_json(
        out / "data.json",
        {
            "n_users": split.n_users,
            "n_items": split.n_items,
            "train": len(split.train),
            "valid": len(split.valid),
            "test": len(split.test),
        },
    )


def load_source(config: DataConfig) -> Dataset:
    """Return the dataset ``config`` names: synthetic, a logs file with tables, or a dataset."""
    if config.source == SOURCES_SYNTHETIC:
        return synthetic_dataset(
            config.synthetic_users,
            config.synthetic_items,
            config.synthetic_per_user,
            config.synthetic_seed,
        )
    if config.user_features or config.item_features:
        return load_logs(
            config.source,
            config.user_features or None,
            config.item_features or None,
            tuple(config.text_columns),
        )
    return load_dataset(config.source)


def data_step(config: DataConfig, out: Path) -> None:
    """Load (or generate) the interactions and split them."""
    dataset = load_source(config)
    split = split_random(
        dataset.interactions,
        dataset.n_users,
        dataset.n_items,
        tuple(config.split.ratios),
        config.split.seed,
    )
    write_data(
        out,
        DataArtifacts(
            split,
            dataset.users.ids,
            dataset.items.ids,
            dataset.user_features,
            dataset.item_features,
        ),
    )


def load_data(path: Path) -> DataArtifacts:
    """Return what :func:`write_data` wrote."""
    return DataArtifacts(
        split=artifacts.load_split(path / "split.safetensors"),
        user_ids=read_npy(path / "users.npy"),
        item_ids=read_npy(path / "items.npy"),
        user_features=artifacts.load_feature_table(path / "user_features.safetensors"),
        item_features=artifacts.load_feature_table(path / "item_features.safetensors"),
    )


# -- two-tower and embeddings -----------------------------------------------------------------


def two_tower_model_config(config: TwoTowerStepConfig, data: Dataset) -> TwoTowerConfig:
    """Return the two-tower shape ``config`` asks for on ``data``'s users, items and features."""
    from slimrank.retrieval.two_tower_config import FeatureSpec, TwoTowerConfig

    split = data.split
    spec_u = FeatureSpec.from_table(data.user_features) if config.use_features else FeatureSpec()
    spec_i = FeatureSpec.from_table(data.item_features) if config.use_features else FeatureSpec()
    return TwoTowerConfig(
        n_users=split.n_users,
        n_items=split.n_items,
        dim=config.dim,
        id_dim=config.id_dim,
        hidden=config.hidden,
        dropout=config.dropout,
        use_history=config.use_history,
        max_history=config.max_history,
        temperature=config.temperature,
        projection=config.projection,
        normalize=config.normalize,
        item_bias=config.item_bias,
        history_power=config.history_power,
        init_std=config.init_std,
        user_features=spec_u,
        item_features=spec_i,
    )


def two_tower_step(config: TwoTowerStepConfig, data_dir: Path, out: Path, k: int) -> None:
    """Train the two-tower model on the training split; save it and its full-ranking metrics."""
    from slimrank.retrieval.train import evaluate_model, train_two_tower
    from slimrank.retrieval.two_tower import save_model

    data = load_data(data_dir)
    split = data.split
    model_config = two_tower_model_config(config, data)
    result = train_two_tower(
        model_config, config.train, split, data.user_features, data.item_features
    )
    save_model(result.model, out / "model")
    metrics = {
        view: evaluate_model(
            result.model,
            split,
            view,
            data.user_features,
            data.item_features,
            ks=(k,),
            max_users=config.train.eval_users,
        )
        for view in ("valid", "test")
    }
    artifacts.save_metrics(out, {"best_epoch": result.best_epoch, **metrics})


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Item vectors, user vectors of each view, and the training items' history/target folds."""

    item: np.ndarray  # (I, d)
    user: dict[str, np.ndarray]  # view -> (U, d); views "fold0", ..., "valid", "test"
    history: list[sp.csr_matrix]  # per fold, (U, I) history part of the training items
    target: list[sp.csr_matrix]  # per fold, (U, I) target part
    # Per fold, (I, d) item vectors of the fold's own two-tower (refit), else empty.
    fold_item: list[np.ndarray] = dataclasses.field(default_factory=list)


def embeddings_step(
    config: CandidateConfig,
    data_dir: Path,
    model_dir: Path,
    out: Path,
    refit: TwoTowerTrainConfig | None = None,
) -> None:
    """Export item vectors and the user vectors of each view; cut the training folds.

    With ``refit`` (the training config), each fold gets its own two-tower, trained on the
    fold's history with the saved model's shape; its vectors are rotated onto the saved
    model's item vectors (:func:`~slimrank.ranking.train.procrustes_align`), which keeps
    every inner product and makes the embedding features comparable across models.
    """
    from slimrank.ranking.train import procrustes_align
    from slimrank.retrieval.embeddings import export_embeddings, history_for
    from slimrank.retrieval.train import train_two_tower
    from slimrank.retrieval.two_tower import UserHistory, load_model

    data = load_data(data_dir)
    split = data.split
    model = load_model(model_dir / "model")
    views = {
        "valid": history_for(split, "valid", model.config.max_history),
        "test": history_for(split, "test", model.config.max_history),
    }
    tensors: dict[str, np.ndarray] = {}
    fold_logs = []  # per fold, the history part as interactions
    for i in range(config.folds):
        history, target = split_history(
            split.train_matrix(), config.target_frac, config.fold_seed + i
        )
        fold_logs.append(artifacts.interactions_from_matrix(history))
        views[f"fold{i}"] = UserHistory.from_interactions(
            fold_logs[i], split.n_users, model.config.max_history
        )
        for name, m in ((f"history{i}", history), (f"target{i}", target)):
            tensors[f"{name}/indptr"] = m.indptr.astype(np.int64)
            tensors[f"{name}/indices"] = m.indices.astype(np.int64)
    for name, hist in views.items():
        user, item = export_embeddings(model, hist, data.user_features, data.item_features)
        tensors[f"user/{name}"] = user
        tensors["item"] = item
    for i in range(config.folds if refit is not None else 0):
        history = fold_logs[i]
        fold_split = dataclasses.replace(split, train=history)
        log.info("fold %d: training a two-tower on %d history items", i, len(history))
        fold_model = train_two_tower(
            model.config, refit, fold_split, data.user_features, data.item_features
        ).model
        user, item = export_embeddings(
            fold_model, views[f"fold{i}"], data.user_features, data.item_features
        )
        rot = procrustes_align(item, tensors["item"])
        tensors[f"user/fold{i}"] = (user @ rot).astype(np.float32)
        tensors[f"item/fold{i}"] = (item @ rot).astype(np.float32)
    write_tensors(out / "embeddings.safetensors", tensors)


def load_embeddings(path: Path, n_users: int, n_items: int) -> Embeddings:
    """Return what :func:`embeddings_step` wrote."""
    t = read_tensors(path / "embeddings.safetensors")

    def csr(name: str) -> sp.csr_matrix:
        idx = t[f"{name}/indices"]
        data = np.ones(len(idx), dtype=np.float32)
        return sp.csr_matrix((data, idx, t[f"{name}/indptr"]), shape=(n_users, n_items))

    user = {k.removeprefix("user/"): v for k, v in t.items() if k.startswith("user/")}
    folds = sum(1 for k in t if k.startswith("history") and k.endswith("/indptr"))
    history = [csr(f"history{i}") for i in range(folds)]
    fold_item = [t[f"item/fold{i}"] for i in range(folds) if f"item/fold{i}" in t]
    targets = [csr(f"target{i}") for i in range(folds)]
    return Embeddings(t["item"], user, history, targets, fold_item)


# -- index -------------------------------------------------------------------------------------


def index_step(config: IndexConfig, data_dir: Path, emb_dir: Path, out: Path) -> None:
    """Build the FAISS index over item vectors, tuned on the test view's user vectors."""
    from slimrank.retrieval.index import build_index
    from slimrank.retrieval.index_io import save_index

    split = artifacts.load_split(data_dir / "split.safetensors")
    emb = load_embeddings(emb_dir, split.n_users, split.n_items)
    rng = np.random.default_rng(config.seed)
    queries = emb.user["test"]
    pick = np.sort(rng.choice(len(queries), min(len(queries), config.tuning.n_queries), False))
    index = build_index(emb.item, config, tune_queries=queries[pick], progress=False)
    save_index(index, out / "index")


def load_search(index_dir: Path) -> RetrievalIndex:
    """Return the saved :class:`RetrievalIndex` (its ``search`` is a ``SearchFn``)."""
    from slimrank.retrieval.index_io import load_index

    return load_index(index_dir / "index", mmap=False)


# -- candidates --------------------------------------------------------------------------------


def candidates_step(
    config: CandidateConfig,
    k: int,
    data_dir: Path,
    emb_dir: Path,
    index_dir: Path,
    out: Path,
    engine: Engine | None = None,
) -> None:
    """Mine and featurize the candidates of each view; keep the test view's serving tables.

    Training users: retrieval, features and exclusion see only the history fold, the target
    fold gives the labels. Validation and test: the protocol's seen items, truth as labels.
    """
    engine = engine or LocalEngine()
    data = load_data(data_dir)
    split = data.split
    emb = load_embeddings(emb_dir, split.n_users, split.n_items)
    index = load_search(index_dir)
    metrics: dict[str, Any] = {}

    # Each view's timestamps, built once: a fold's history is part of the training items,
    # which are what the valid view has seen.
    times_of = {view: data.seen_times(view) for view in ("valid", "test")}
    train_times = times_of["valid"]

    def mine(
        observed: sp.csr_matrix,
        truth: sp.csr_matrix,
        user_vecs: np.ndarray,
        item_vecs: np.ndarray = emb.item,
        search: RetrievalIndex = index,
        times: sp.csr_matrix = train_times,
        limit: int = 0,
        salt: int = 0,
        item_item: FeatureTables | None = None,
    ) -> tuple:
        started = time.perf_counter()
        tables = build_feature_tables(
            observed,
            user_vecs,
            item_vecs,
            data.user_features,
            data.item_features,
            config.features,
            time=times,
            item_item=item_item,
        )
        log.info(
            "candidates: feature tables of %d users x %d items %s in %.0f s",
            *observed.shape,
            "built" if item_item is None else "built on the fold's item-item tables",
            time.perf_counter() - started,
        )
        started = time.perf_counter()
        users = sample_users(truth, limit, config.fold_seed, salt)
        mined = engine.mine(tables, user_vecs, search, users, config.n, observed, truth)
        log.info(
            "candidates: %d users' top %d mined and featurized in %.0f s",
            len(users),
            config.n,
            time.perf_counter() - started,
        )
        return tables, *mined

    def fold_search(i: int) -> tuple[np.ndarray, RetrievalIndex]:
        """A refit fold's item vectors and an exact index over them, else the model's."""
        from slimrank.retrieval.index import IndexConfig, build_index

        if i >= len(emb.fold_item):
            return emb.item, index
        flat = build_index(emb.fold_item[i], IndexConfig(kind="flat"), progress=False)
        return emb.fold_item[i], flat

    folds = [
        mine(
            emb.history[i],
            emb.target[i],
            emb.user[f"fold{i}"],
            *fold_search(i),
            limit=config.sample_users,
            salt=i,
        )
        for i in range(len(emb.history))
    ]
    # "fold": the valid view reads the first fold's item-item tables (built from a subset of
    # train, so nothing valid holds out leaks into them).
    shared = folds[0][0] if config.valid_tables == "fold" else None
    parts = [fold[1:] for fold in folds]
    del folds  # the folds' tables, but for the one shared
    cands = Candidates(*(np.concatenate([getattr(p[0], f) for p in parts]) for f in _CANDS))
    feats = dataclasses.replace(
        parts[0][1],
        values=np.concatenate([p[1].values for p in parts]),
        user=cands.user,
        items=cands.items,
    )
    labels = np.concatenate([p[2] for p in parts])
    artifacts.save_view(out / "train.safetensors", cands, feats, labels)
    del parts, cands, feats, labels  # 1 KiB a candidate: GiBs at 5,000 sampled users

    def view_tables(view: str, item_item: FeatureTables | None = None) -> FeatureTables:
        """Mine, featurize and save ``view``'s candidates; return its feature tables."""
        truth = data.truth(view)
        tables, cands, feats, labels = mine(
            data.seen(view),
            truth,
            emb.user[view],
            times=times_of[view],
            limit=config.eval_users,
            salt=VIEWS.index(view) + 1000,
            item_item=item_item,
        )
        artifacts.save_view(out / f"{view}.safetensors", cands, feats, labels)
        metrics[view] = pipeline_metrics(cands, cands.retrieval_score, truth, (k,))
        return tables

    view_tables("valid", shared)  # not served: its tables are freed here
    del shared
    # The test view's tables are what a server knows: train + valid interactions.
    layout = save_tables(out / "serving_tables.safetensors", view_tables("test"))
    write_json(out / "serving_layout.json", layout)
    artifacts.save_metrics(out, metrics)


def sample_users(truth: sp.spmatrix, limit: int, seed: int, salt: int) -> np.ndarray:
    """Return the users with a relevant item in ``truth``, or a seeded sample of ``limit`` of
    them (sorted) when ``limit`` > 0 and there are more."""
    users = np.flatnonzero(np.diff(sp.csr_matrix(truth).indptr) > 0)
    if 0 < limit < len(users):
        rng = np.random.default_rng([seed, salt])
        users = np.sort(rng.choice(users, limit, replace=False))
    return users


def load_views(path: Path) -> dict[str, tuple[Candidates, CandidateFeatures, np.ndarray]]:
    """Return ``{view: (candidates, features, labels)}`` of the candidates step."""
    return {view: artifacts.load_view(path / f"{view}.safetensors") for view in VIEWS}


def evaluate_views(
    views: dict[str, tuple[Candidates, CandidateFeatures, np.ndarray]],
    data: DataArtifacts,
    score: Any,
    k: int,
) -> dict[str, dict[str, float]]:
    """Return the pipeline metrics on "valid" and "test" of ``score(features) -> (U, N)``."""
    out = {}
    for view in ("valid", "test"):
        cands, feats, _ = views[view]
        out[view] = pipeline_metrics(cands, score(feats), data.truth(view), (k,))
    return out


def evaluate_scores(
    views: dict[str, tuple[Candidates, CandidateFeatures, np.ndarray]],
    data: DataArtifacts,
    scores: dict[str, np.ndarray],
    k: int,
) -> dict[str, dict[str, float]]:
    """Return the pipeline metrics on "valid" and "test" of scores already computed per view
    (``(U, N)`` each), so a ranker is not run a second time to be evaluated."""
    return {
        view: pipeline_metrics(views[view][0], scores[view], data.truth(view), (k,))
        for view in ("valid", "test")
    }


# -- teacher -----------------------------------------------------------------------------------


def teacher_step(
    config: TeacherStepConfig,
    k: int,
    data_dir: Path,
    cand_dir: Path,
    out: Path,
    engine: Engine | None = None,
) -> None:
    """Train the DCN-v2 teacher, early-stopped on validation NDCG; save it and its scores."""
    from slimrank.ranking.pipeline_eval import PipelineView
    from slimrank.ranking.teacher import TeacherConfig, save_teacher, teacher_scores
    from slimrank.ranking.train import train_teacher

    data = load_data(data_dir)
    views = load_views(cand_dir)
    _, feats, labels = views["train"]
    model_config = TeacherConfig(
        n_features=feats.values.shape[-1],
        n_users=data.split.n_users,
        n_items=data.split.n_items,
        id_dim=config.id_dim,
        n_cross=config.n_cross,
        deep=config.deep,
        dropout=config.dropout,
        id_dropout=config.id_dropout,
    )
    v_cands, v_feats, _ = views["valid"]
    valid = PipelineView(v_cands, v_feats, data.truth("valid"))
    train_config = dataclasses.replace(config.train, metric=f"ndcg@{k}")
    result = train_teacher(
        model_config,
        feats,
        labels,
        validate=lambda m: valid.evaluate(lambda f: teacher_scores(m, f), (k,)),
        config=train_config,
        progress=False,
    )
    save_teacher(result.model, out / "teacher", feats.names, {"best_epoch": result.best_epoch})
    engine = engine or LocalEngine()
    scores = {view: engine.teacher_scores(result.model, views[view][1]) for view in VIEWS}
    write_tensors(out / artifacts.SCORES, scores)
    metrics = evaluate_scores(views, data, scores, k)
    artifacts.save_metrics(out, {"best_epoch": result.best_epoch, **metrics})


def rescore_teacher_step(
    source: Path,
    version: str,
    k: int,
    data_dir: Path,
    cand_dir: Path,
    out: Path,
    engine: Engine | None = None,
) -> None:
    """Reuse a trained teacher: copy it, score the (new) candidates, record its version."""
    from slimrank.ranking.teacher import load_teacher

    model, names = load_teacher(source)
    data = load_data(data_dir)
    views = load_views(cand_dir)
    if tuple(names) != tuple(views["train"][1].names):
        raise ValueError(
            f"teacher {version} expects {len(names)} features that differ from the "
            f"{len(views['train'][1].names)} the candidates have: retrain it (--retrain-teacher)"
        )
    shutil.copytree(source, out / "teacher", ignore=shutil.ignore_patterns("step.json"))
    engine = engine or LocalEngine()
    scores = {view: engine.teacher_scores(model, views[view][1]) for view in VIEWS}
    write_tensors(out / artifacts.SCORES, scores)
    metrics = evaluate_scores(views, data, scores, k)
    artifacts.save_metrics(out, {"imported": version, **metrics})
    (out / "teacher_version.txt").write_text(version + "\n")


def load_teacher_scores(path: Path) -> dict[str, np.ndarray]:
    """Return the teacher's ``(U, N)`` scores of each view (``-inf`` at pads)."""
    return read_tensors(path / artifacts.SCORES)


# -- catalog: text index, filterable attributes, titles ----------------------------------------


def catalog_step(config: DataConfig, text: TextIndexConfig, data_dir: Path, out: Path) -> None:
    """Build the search catalog of the data step's items (same rows, same order)."""
    from slimrank.search.build import build_catalog
    from slimrank.search.catalog import save_catalog

    dataset = load_source(config)
    item_ids = read_npy(data_dir / "items.npy")
    if not np.array_equal(np.asarray(dataset.items.ids, dtype=str), item_ids):
        raise ValueError(f"{config.source}: items differ from the data step's; re-run data")
    columns = dict(dataset.item_text or {})
    if dataset.item_titles is not None and not columns:
        columns = {"title": np.asarray(dataset.item_titles, dtype=str)}
    catalog = build_catalog(item_ids, dataset.item_features, columns, None, text)
    save_catalog(out / "catalog", catalog)
    artifacts.save_metrics(
        out,
        {"items": catalog.n_items, "terms": len(catalog.text.vocab), "fields": catalog.fields},
    )
