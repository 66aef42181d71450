"""Training the teacher on mined candidates, early-stopped on the pipeline's validation NDCG."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from rich.progress import Progress

from slimrank.config import Config, require
from slimrank.data.dataset import FeatureTable
from slimrank.ranking.candidates import (
    exact_search,
    label_candidates,
    mine_candidates,
    split_history,
)
from slimrank.ranking.features import (
    CandidateFeatures,
    FeatureConfig,
    build_feature_tables,
    candidate_features,
)
from slimrank.ranking.teacher import DCNv2, TeacherConfig

log = logging.getLogger(__name__)

LOSSES = ("softmax", "bce")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How the teacher is trained."""

    epochs: int = 20
    batch_users: int = 32
    list_size: int = 64  # candidates sampled per user and step; 0 uses the whole list
    lr: float = 1e-3
    weight_decay: float = 1e-5
    loss: str = "softmax"  # listwise softmax over each user's candidates, or pointwise BCE
    grad_clip: float = 5.0  # max global gradient norm; 0 disables
    patience: int = 3  # epochs without a better validation metric before stopping
    metric: str = "ndcg@10"
    seed: int = 2020
    threads: int = 1  # on a shared, busy machine one thread beats two (no spin-waiting)

    def __post_init__(self) -> None:
        require(self.epochs > 0, self, "epochs", self.epochs, "> 0")
        require(self.batch_users > 0, self, "batch_users", self.batch_users, "> 0")
        require(self.list_size >= 0, self, "list_size", self.list_size, ">= 0")
        require(self.lr > 0, self, "lr", self.lr, "> 0")
        require(self.weight_decay >= 0, self, "weight_decay", self.weight_decay, ">= 0")
        require(self.loss in LOSSES, self, "loss", self.loss, f"one of {LOSSES}")
        require(self.grad_clip >= 0, self, "grad_clip", self.grad_clip, ">= 0")
        require(self.patience > 0, self, "patience", self.patience, "> 0")
        require(self.threads > 0, self, "threads", self.threads, "> 0")


@dataclasses.dataclass
class TrainResult:
    """The best model (by the validation metric), when it was reached, and every epoch's log."""

    model: DCNv2
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]]


def listwise_softmax_loss(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Return the mean over lists with a positive of ``-mean_pos log softmax(scores)``.

    ``scores``, ``labels`` and ``mask`` are (B, N); pads (mask False) take no probability.
    """
    s = scores.masked_fill(~mask, float("-inf"))
    log_p = torch.log_softmax(s, dim=1)  # (B, N)
    pos = (labels > 0) & mask
    n_pos = pos.sum(dim=1)
    per_list = -(log_p.masked_fill(~pos, 0.0)).sum(dim=1) / n_pos.clamp_min(1)
    keep = n_pos > 0
    return per_list[keep].mean() if keep.any() else scores.sum() * 0.0


def bce_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the binary cross-entropy over real candidates."""
    return torch.nn.functional.binary_cross_entropy_with_logits(scores[mask], labels[mask])


def train_teacher(
    model_config: TeacherConfig,
    feats: CandidateFeatures,
    labels: np.ndarray,
    validate: Callable[[DCNv2], dict[str, float]] | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Return a DCN-v2 trained on ``feats`` (U, N, F) with ``labels`` (U, N).

    Before training and after each epoch ``validate(model)`` (e.g. a
    :class:`~slimrank.ranking.pipeline_eval.PipelineView` run) gives metrics; training stops
    after ``patience`` epochs without a better ``metric`` and returns the best model (epoch 0 is
    the untrained one). Without ``validate`` the last epoch is returned.
    """
    config = config or TrainConfig()
    require(
        labels.shape == feats.items.shape,
        "train_teacher",
        "labels",
        labels.shape,
        f"expected {feats.items.shape}",
    )
    # Left set: the pipeline runs the steps after the teacher on this count too, also when the
    # teacher comes from the step cache (slimrank.pipeline.run.compression_threads).
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    lists = np.flatnonzero(((labels > 0) & feats.mask).any(axis=1))
    if config.loss == "bce":
        lists = np.flatnonzero(feats.mask.any(axis=1))
    require(len(lists) > 0, "train_teacher", "labels", int(labels.sum()), "no list to learn")
    model = DCNv2(model_config)
    model.fit_normalization(feats.values, feats.mask)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    loss_fn = listwise_softmax_loss if config.loss == "softmax" else bce_loss
    x_all = torch.from_numpy(feats.values)  # (U, N, F)
    y_all = torch.from_numpy(labels.astype(np.float32))
    users_all = torch.from_numpy(feats.user)
    items_all = torch.from_numpy(feats.items)
    n = feats.items.shape[1]
    width = n if config.list_size == 0 else min(config.list_size, n)
    best_state, best_metric, best_epoch = None, -np.inf, 0
    history: list[dict[str, float]] = []
    if validate is not None:
        # Epoch 0 is the untrained model: with a base feature it is that feature's ranking, and
        # training must beat it to be kept.
        record = {"epoch": 0.0, **{f"valid_{k}": v for k, v in validate(model).items()}}
        best_state = copy.deepcopy(model.state_dict())
        best_metric = record[f"valid_{config.metric}"]
        history.append(record)
        model.train()
    steps = int(np.ceil(len(lists) / config.batch_users))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("teacher", total=config.epochs * steps)
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = rng.permutation(lists)
            total, count = 0.0, 0
            for start in range(0, len(order), config.batch_users):
                rows = torch.from_numpy(order[start : start + config.batch_users])
                # A random subset of each list: softmax over sampled negatives keeps steps cheap.
                cols = torch.from_numpy(np.argsort(rng.random((len(rows), n)), axis=1)[:, :width])
                x = x_all[rows[:, None], cols]  # (B, W, F)
                y = y_all[rows[:, None], cols]  # (B, W)
                items = items_all[rows[:, None], cols]  # (B, W)
                scores = model(x, users_all[rows][:, None], items)  # (B, W)
                loss = loss_fn(scores, y, items >= 0)
                optimizer.zero_grad()
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                total += loss.item() * len(rows)
                count += len(rows)
                bar.advance(task)
            record = {"epoch": float(epoch), "loss": total / max(count, 1)}
            if validate is not None:
                record.update({f"valid_{k}": v for k, v in validate(model).items()})
                metric = record[f"valid_{config.metric}"]
                if metric > best_metric:
                    best_state = copy.deepcopy(model.state_dict())
                    best_metric, best_epoch = metric, epoch
            log.info("teacher epoch %d: %s", epoch, record)
            history.append(record)
            if validate is not None and epoch - best_epoch >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch, best_metric = len(history), float("nan")
    model.eval()
    return TrainResult(model, best_epoch, best_metric, history)


# Fits retrieval vectors on an observed matrix: csr (n_users, n_items) -> (user_vecs, item_vecs).
FitVectors = Callable[[sp.csr_matrix], tuple[np.ndarray, np.ndarray]]


def procrustes_align(vecs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Return the (d, d) rotation ``R`` minimizing ``||vecs @ R - reference||`` (orthogonal).

    Embeddings fitted on different data live in arbitrarily rotated coordinates; rotating a
    fold's user and item vectors by the same ``R`` keeps every inner product and puts the
    coordinates (which are features) on the reference's axes.
    """
    u, _, wt = np.linalg.svd(np.asarray(vecs, np.float64).T @ np.asarray(reference, np.float64))
    return u @ wt  # (d, d)


def fold_training_set(
    train: sp.csr_matrix,
    fit_vectors: FitVectors,
    reference_item_vecs: np.ndarray,
    n: int = 200,
    folds: int = 3,
    target_frac: float = 0.2,
    seed: int = 0,
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
    feature_config: FeatureConfig | None = None,
) -> tuple[CandidateFeatures, np.ndarray]:
    """Return leakage-free training lists: features (U', N, F) and labels (U', N).

    For each fold, each user's training items are split into history and target
    (:func:`~slimrank.ranking.candidates.split_history`); retrieval vectors (``fit_vectors``)
    and feature tables are fitted on the history only, the vectors rotated onto
    ``reference_item_vecs`` (the serving model's), candidates mined excluding the history and
    labelled by the target. Lists of all folds are stacked; a user appears once per fold.
    """
    parts, label_parts = [], []
    for fold in range(folds):
        history, target = split_history(train, target_frac, seed + fold)
        user_vecs, item_vecs = fit_vectors(history)
        rot = procrustes_align(item_vecs, reference_item_vecs)
        user_vecs = (user_vecs @ rot).astype(np.float32)
        item_vecs = (item_vecs @ rot).astype(np.float32)
        tables = build_feature_tables(
            history, user_vecs, item_vecs, user_features, item_features, feature_config
        )
        users = np.flatnonzero(np.diff(target.indptr) > 0)
        cands = mine_candidates(user_vecs, exact_search(item_vecs), users, n, history)
        parts.append(candidate_features(tables, cands))
        label_parts.append(label_candidates(cands, target))
        log.info("fold %d: %d lists, %d positives", fold, len(users), int(label_parts[-1].sum()))
    feats = CandidateFeatures(
        np.concatenate([p.values for p in parts]),
        parts[0].names,
        np.concatenate([p.user for p in parts]),
        np.concatenate([p.items for p in parts]),
    )
    return feats, np.concatenate(label_parts)
