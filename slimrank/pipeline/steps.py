"""The offline steps up to the teacher; each returns its output artifact from its input ones.

Order and inputs (each step's cache key is its config plus the digests of these inputs; the
table is :data:`slimrank.pipeline.run.STEP_TABLE`)::

    data -> two_tower -> embeddings -> index -> candidates -> teacher
         -> student_plain, student_distill, student_pseudo, student_seeds
         -> student_pruned, pruned_taylor, pruned_l1 -> int8, precision   (compress_steps)

``embeddings`` holds the user views: ``fold<i>`` (pools the history fold ``i`` of the training
items; training candidates are mined with it), ``valid`` (pools the training items) and
``test`` (training and validation items: what a server knows). Every ranker variant is
evaluated with the pipeline protocol (retrieve ``n``, rank, top ``k``) on the validation view
(selection, the gate) and the test view (reported). The runner loads a step's input
artifacts and saves its output one (:mod:`slimrank.pipeline.artifacts`); no step here reads
or writes a file.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from slimrank.data.dataset import Dataset, Interactions, load_dataset, split_random
from slimrank.data.logs import load_logs
from slimrank.pipeline import artifacts
from slimrank.pipeline.artifacts import (
    VIEWS,
    CandidatesArtifact,
    CatalogArtifact,
    DataArtifact,
    EmbeddingsArtifact,
    IndexArtifact,
    TeacherArtifact,
    TeacherModel,
    TwoTowerArtifact,
    View,
)
from slimrank.pipeline.config import (
    SOURCES_SYNTHETIC,
    CandidateConfig,
    DataConfig,
    TeacherStepConfig,
    TwoTowerStepConfig,
)
from slimrank.pipeline.engine import LocalEngine
from slimrank.pipeline.synthetic import synthetic_dataset
from slimrank.ranking.candidates import Candidates, fold_item_history, split_history
from slimrank.ranking.features import FeatureTables, build_feature_tables
from slimrank.ranking.pipeline_eval import pipeline_metrics
from slimrank.search.build import TextIndexConfig

if TYPE_CHECKING:
    from slimrank.pipeline.engine import Engine
    from slimrank.ranking.features import CandidateFeatures
    from slimrank.ranking.teacher import TeacherConfig
    from slimrank.ranking.train import TrainResult
    from slimrank.retrieval.index import IndexConfig, RetrievalIndex
    from slimrank.retrieval.train import TrainConfig as TwoTowerTrainConfig
    from slimrank.retrieval.two_tower_config import TwoTowerConfig

log = logging.getLogger(__name__)

_CANDS = ("user", "items", "retrieval_score")


# -- data ---------------------------------------------------------------------------------------


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


def data_step(config: DataConfig) -> DataArtifact:
    """Load (or generate) the interactions and split them."""
    dataset = load_source(config)
    split = split_random(
        dataset.interactions,
        dataset.n_users,
        dataset.n_items,
        tuple(config.split.ratios),
        config.split.seed,
    )
    return DataArtifact(
        split,
        dataset.users.ids,
        dataset.items.ids,
        dataset.user_features,
        dataset.item_features,
    )


# -- two-tower and embeddings -----------------------------------------------------------------


def two_tower_model_config(config: TwoTowerStepConfig, data: DataArtifact) -> TwoTowerConfig:
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


def training_folds(
    train: sp.csr_matrix, config: CandidateConfig
) -> list[tuple[sp.csr_matrix, sp.csr_matrix]]:
    """Return each training fold's ``(history, target)`` cut of every user's ``train`` items."""
    return [
        split_history(train, config.target_frac, config.fold_seed + i) for i in range(config.folds)
    ]


def fold_label_users(target: sp.csr_matrix, config: CandidateConfig, fold: int) -> np.ndarray:
    """Return the users whose lists fold ``fold`` trains the rankers on (its sampled users)."""
    return sample_users(target, config.sample_users, config.fold_seed, fold)


def held_out_labels(train: sp.csr_matrix, config: CandidateConfig) -> sp.csr_matrix:
    """Return the training lists' labels: each fold's target items of its sampled users, as
    a binary ``(U, I)`` matrix (what the main two-tower must not train on without refit)."""
    held = sp.csr_matrix(train.shape, dtype=np.float32)
    for i, (_, target) in enumerate(training_folds(train, config)):
        rows = np.zeros(target.shape[0], dtype=np.float32)
        rows[fold_label_users(target, config, i)] = 1.0
        held = held + sp.diags(rows) @ target
    held = sp.csr_matrix(held)
    held.data[:] = 1.0
    held.eliminate_zeros()
    return held


def drop_pairs(log: Interactions, pairs: sp.csr_matrix) -> Interactions:
    """Return ``log`` without its rows whose ``(user, item)`` is a non-zero of ``pairs``."""
    coo = pairs.tocoo()
    n_items = np.int64(pairs.shape[1])
    held = coo.row.astype(np.int64) * n_items + coo.col
    return log.take(~np.isin(log.user * n_items + log.item, held))


def two_tower_step(
    config: TwoTowerStepConfig,
    data: DataArtifact,
    k: int,
    folds: CandidateConfig | None = None,
) -> TwoTowerArtifact:
    """Train the two-tower model on the training split, with its full-ranking metrics.

    With ``folds.hold_out_labels == "sampled"`` it trains on train minus the labels of the
    rankers' training lists (:func:`held_out_labels`), so that the retrieval scores and
    embedding features of those lists are as blind to their labels as valid's and test's.
    """
    from slimrank.retrieval.train import evaluate_model, train_two_tower

    split = data.split
    model_config = two_tower_model_config(config, data)
    fit_split = split
    held_out = 0
    if folds is not None and folds.hold_out_labels == "sampled":
        held = held_out_labels(split.train_matrix(), folds)
        fit_split = dataclasses.replace(split, train=drop_pairs(split.train, held))
        held_out = len(split.train) - len(fit_split.train)
        log.info("two-tower: %d training interactions held out (the rankers' labels)", held_out)
    result = train_two_tower(
        model_config, config.train, fit_split, data.user_features, data.item_features
    )
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
    record = {"best_epoch": result.best_epoch, "held_out_labels": held_out}
    return TwoTowerArtifact(result.model, {**record, **metrics})


def embeddings_step(
    config: CandidateConfig,
    data: DataArtifact,
    two_tower: TwoTowerArtifact,
    refit: TwoTowerTrainConfig | None = None,
) -> EmbeddingsArtifact:
    """Export item vectors and the user vectors of each view; cut the training folds.

    With ``refit`` (the training config), each fold gets its own two-tower, trained on the
    fold's history with the saved model's shape; its vectors are rotated onto the saved
    model's item vectors (:func:`~slimrank.ranking.train.procrustes_align`), which keeps
    every inner product and makes the embedding features comparable across models.
    """
    from slimrank.ranking.train import procrustes_align
    from slimrank.retrieval.embeddings import export_embeddings, history_for
    from slimrank.retrieval.train import train_two_tower
    from slimrank.retrieval.two_tower import UserHistory

    split = data.split
    model = two_tower.model
    views = {
        "valid": history_for(split, "valid", model.config.max_history),
        "test": history_for(split, "test", model.config.max_history),
    }
    history: list[sp.csr_matrix] = []
    target: list[sp.csr_matrix] = []
    fold_logs = []  # per fold, the history part as interactions
    for i, (fold_history, fold_target) in enumerate(training_folds(split.train_matrix(), config)):
        history.append(fold_history)
        target.append(fold_target)
        fold_logs.append(artifacts.interactions_from_matrix(fold_history))
        views[f"fold{i}"] = UserHistory.from_interactions(
            fold_logs[i], split.n_users, model.config.max_history
        )
    user: dict[str, np.ndarray] = {}
    item = np.zeros((0, 0), dtype=np.float32)
    for name, hist in views.items():
        user[name], item = export_embeddings(model, hist, data.user_features, data.item_features)
    fold_item: list[np.ndarray] = []
    for i in range(config.folds if refit is not None else 0):
        fold_log = fold_logs[i]
        fold_split = dataclasses.replace(split, train=fold_log)
        log.info("fold %d: training a two-tower on %d history items", i, len(fold_log))
        fold_model = train_two_tower(
            model.config, refit, fold_split, data.user_features, data.item_features
        ).model
        fold_user, fold_vecs = export_embeddings(
            fold_model, views[f"fold{i}"], data.user_features, data.item_features
        )
        rot = procrustes_align(fold_vecs, item)
        user[f"fold{i}"] = (fold_user @ rot).astype(np.float32)
        fold_item.append((fold_vecs @ rot).astype(np.float32))
    return EmbeddingsArtifact(item, user, history, target, fold_item)


# -- index -------------------------------------------------------------------------------------


def index_step(config: IndexConfig, embeddings: EmbeddingsArtifact) -> IndexArtifact:
    """Build the FAISS index over item vectors, tuned on the test view's user vectors."""
    from slimrank.retrieval.index import build_index

    rng = np.random.default_rng(config.seed)
    queries = embeddings.user["test"]
    pick = np.sort(rng.choice(len(queries), min(len(queries), config.tuning.n_queries), False))
    return IndexArtifact(
        build_index(embeddings.item, config, tune_queries=queries[pick], progress=False)
    )


# -- candidates --------------------------------------------------------------------------------


def candidates_step(
    config: CandidateConfig,
    k: int,
    data: DataArtifact,
    embeddings: EmbeddingsArtifact,
    index_artifact: IndexArtifact,
    engine: Engine | None = None,
) -> CandidatesArtifact:
    """Mine and featurize the candidates of each view; keep the test view's serving tables.

    Training users: retrieval, their own features and exclusion see only the history fold,
    the target fold gives the labels; the item statistics read the other users' target folds
    too (``config.fold_items``). Validation and test: the protocol's seen items, truth as
    labels.
    """
    engine = engine or LocalEngine()
    emb = embeddings
    index = index_artifact.index
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
        fold: bool = False,
    ) -> tuple:
        # A fold's labels are ``truth`` (its target fold): its item statistics read every
        # user's training items but the sampled users' targets, as complete as the served
        # tables' and blind to the labels (fold_item_history).
        users = sample_users(truth, limit, config.fold_seed, salt)
        item_history = None
        if fold and config.fold_items == "all":
            item_history = fold_item_history(observed, truth, users)
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
            item_history=item_history,
        )
        del item_history
        log.info(
            "candidates: feature tables of %d users x %d items %s in %.0f s",
            *observed.shape,
            "built" if item_item is None else "built on the fold's item-item tables",
            time.perf_counter() - started,
        )
        started = time.perf_counter()
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
            fold=True,
        )
        for i in range(len(emb.history))
    ]
    # "fold": the valid view reads the first fold's item-item tables (built from a subset of
    # train either way, so nothing valid holds out leaks into them).
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
    views: dict[str, View] = {"train": (cands, feats, labels)}
    view_tables = {}
    for view, item_item in (("valid", shared), ("test", None)):
        truth = data.truth(view)
        view_tables[view], cands, feats, labels = mine(
            data.seen(view),
            truth,
            emb.user[view],
            times=times_of[view],
            limit=config.eval_users,
            salt=VIEWS.index(view) + 1000,
            item_item=item_item,
        )
        views[view] = (cands, feats, labels)
        metrics[view] = pipeline_metrics(cands, cands.retrieval_score, truth, (k,))
    # The test view's tables are what a server knows: train + valid interactions (named, not
    # whatever the loop above happened to leave behind).
    return CandidatesArtifact(views, metrics, view_tables["test"])


def sample_users(truth: sp.spmatrix, limit: int, seed: int, salt: int) -> np.ndarray:
    """Return the users with a relevant item in ``truth``, or a seeded sample of ``limit`` of
    them (sorted) when ``limit`` > 0 and there are more."""
    users = np.flatnonzero(np.diff(sp.csr_matrix(truth).indptr) > 0)
    if 0 < limit < len(users):
        rng = np.random.default_rng([seed, salt])
        users = np.sort(rng.choice(users, limit, replace=False))
    return users


def evaluate_views(
    views: dict[str, View],
    data: DataArtifact,
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
    views: dict[str, View],
    data: DataArtifact,
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


def teacher_model_config(
    config: TeacherStepConfig,
    n_features: int,
    data: DataArtifact,
    names: tuple[str, ...] = (),
) -> TeacherConfig:
    """Return the teacher model's shape: the step's config, the features' and the split's sizes
    (``names``: the features', where ``config.base_feature`` is looked up)."""
    from slimrank.pipeline.config import ConfigError
    from slimrank.ranking.teacher import TeacherConfig

    base = -1
    if config.base_feature:
        if config.base_feature not in names:
            raise ConfigError(
                "teacher.base_feature", f"{config.base_feature!r} is not a candidate feature"
            )
        base = list(names).index(config.base_feature)
    return TeacherConfig(
        base_feature=base,
        n_features=n_features,
        n_users=data.split.n_users,
        n_items=data.split.n_items,
        id_dim=config.id_dim,
        n_cross=config.n_cross,
        deep=config.deep,
        dropout=config.dropout,
        id_dropout=config.id_dropout,
    )


def train_pipeline_teacher(
    config: TeacherStepConfig,
    k: int,
    data: DataArtifact,
    train: tuple[CandidateFeatures, np.ndarray],
    valid: tuple[Candidates, CandidateFeatures],
    seed: int | None = None,
) -> TrainResult:
    """Train the DCN-v2 teacher on ``train`` (features, labels), early-stopped on the
    pipeline's NDCG@k over the ``valid`` lists (``seed``: instead of the config's)."""
    from slimrank.ranking.pipeline_eval import PipelineView
    from slimrank.ranking.teacher import teacher_scores
    from slimrank.ranking.train import train_teacher

    feats, labels = train
    view = PipelineView(*valid, data.truth("valid"))
    train_config = dataclasses.replace(config.train, metric=f"ndcg@{k}")
    if seed is not None:
        train_config = dataclasses.replace(train_config, seed=seed)
    return train_teacher(
        teacher_model_config(config, feats.values.shape[-1], data, tuple(feats.names)),
        feats,
        labels,
        validate=lambda m: view.evaluate(lambda f: teacher_scores(m, f), (k,)),
        config=train_config,
        progress=False,
    )


def teacher_step(
    config: TeacherStepConfig,
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    engine: Engine | None = None,
) -> TeacherArtifact:
    """Train the DCN-v2 teacher, early-stopped on validation NDCG; score every view once."""
    views = candidates.views
    _, feats, labels = views["train"]
    v_cands, v_feats, _ = views["valid"]
    result = train_pipeline_teacher(config, k, data, (feats, labels), (v_cands, v_feats))
    engine = engine or LocalEngine()
    scores = {view: engine.teacher_scores(result.model, views[view][1]) for view in VIEWS}
    metrics = evaluate_scores(views, data, scores, k)
    record = {"best_epoch": result.best_epoch}
    return TeacherArtifact(result.model, feats.names, record, scores, {**record, **metrics})


def rescore_teacher_step(
    imported: TeacherModel,
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    engine: Engine | None = None,
) -> TeacherArtifact:
    """Reuse a trained teacher: score the (new) candidates with it, keep its version."""
    views = candidates.views
    names = imported.feature_names
    if tuple(names) != tuple(views["train"][1].names):
        raise ValueError(
            f"teacher {imported.version} expects {len(names)} features that differ from the "
            f"{len(views['train'][1].names)} the candidates have: retrain it (--retrain-teacher)"
        )
    engine = engine or LocalEngine()
    scores = {view: engine.teacher_scores(imported.model, views[view][1]) for view in VIEWS}
    metrics = evaluate_scores(views, data, scores, k)
    return TeacherArtifact(
        imported.model,
        names,
        imported.extra,
        scores,
        {"imported": imported.version, **metrics},
        imported.version,
    )


# -- catalog: text index, filterable attributes, titles ----------------------------------------


def catalog_step(config: DataConfig, text: TextIndexConfig, data: DataArtifact) -> CatalogArtifact:
    """Build the search catalog of the data step's items (same rows, same order)."""
    from slimrank.search.build import build_catalog

    dataset = load_source(config)
    item_ids = np.asarray(data.item_ids, dtype=str)
    if not np.array_equal(np.asarray(dataset.items.ids, dtype=str), item_ids):
        raise ValueError(f"{config.source}: items differ from the data step's; re-run data")
    columns = dict(dataset.item_text or {})
    if dataset.item_titles is not None and not columns:
        columns = {"title": np.asarray(dataset.item_titles, dtype=str)}
    catalog = build_catalog(item_ids, dataset.item_features, columns, None, text)
    return CatalogArtifact(
        catalog,
        {"items": catalog.n_items, "terms": len(catalog.text.vocab), "fields": catalog.fields},
    )
