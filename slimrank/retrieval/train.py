"""Training of the two-tower model on the training split, with early stopping on validation.

A batch holds all the training items of a shuffled group of users (about ``batch_size``
items). Two ways to turn them into examples, both of which keep a target out of the history
that predicts it (a user vector that pools its own target learns to find the answer in its
input, which says nothing about unseen items):

- ``examples="masked"`` (default): per user and batch, a random ``mask_share`` of the items
  are targets and the rest are pooled into one user vector; the loss is the full softmax
  cross entropy of the targets (a denoising autoencoder with two towers). One user vector per
  user makes this much cheaper than one per interaction;
- ``examples="leave_one_out"``: one example per interaction, the user vector pooling all the
  user's other items (optionally with history dropout), with one of the losses
  ``softmax`` (full softmax over every item: cheap for the 1,682 items of MovieLens-100k),
  ``sampled_softmax`` (in-batch negatives with the logQ correction, subtracting the log of
  each item's sampling probability, its training popularity, so popular items are not
  pushed down just for appearing often as negatives) or ``bpr`` (one uniform negative).

On ml-100k valid (linear towers, d=128, no user id) masked examples, leave-one-out with the
full softmax and leave-one-out with the in-batch logQ softmax reached the same NDCG@10
(0.223, 0.223, 0.222; BPR 0.183); masked is the default because it trains 3-4x faster.

After every ``eval_every`` epochs the model ranks all items for the validation users (exact
dot products, the protocol of :mod:`slimrank.evaluation.protocol`); training stops after
``patience`` evaluations without a better Recall@k and the best weights are kept.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from slimrank.config import Config, require
from slimrank.data.dataset import FeatureTable, Split, item_popularity
from slimrank.evaluation.protocol import evaluate_full_ranking, evaluated_users
from slimrank.retrieval.embeddings import export_embeddings, history_for
from slimrank.retrieval.two_tower import (
    TwoTower,
    TwoTowerConfig,
    UserHistory,
    bag_rows,
    feature_tensors,
    take_rows,
)

log = logging.getLogger(__name__)

LOSSES = ("softmax", "sampled_softmax", "bpr")
EXAMPLES = ("leave_one_out", "masked", "multinomial")
OPTIMIZERS = ("adamw", "sparse_adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train a :class:`TwoTower`."""

    epochs: int = 100
    batch_size: int = 4096  # training items per batch (whole users)
    lr: float = 3e-3
    weight_decay: float = 0.05  # AdamW, decoupled
    # "adamw": one dense AdamW over every parameter; each step reads and writes every row of
    # every embedding table (at 1M users x 1M items that update was 3/4 of a step's time).
    # "sparse_adam": the embedding tables give sparse gradients (only the batch's rows) and
    # are updated by torch's SparseAdam (lazy Adam: a row's moments move only in steps that
    # touch it), everything else by AdamW. SparseAdam has no weight decay.
    optimizer: str = "adamw"  # one of OPTIMIZERS
    loss: str = "softmax"  # one of LOSSES
    logq: bool = True  # logQ correction of the sampled softmax
    history_dropout: float = 0.0  # drop each history item with this probability
    # "leave_one_out": one example per interaction, its target left out of the pooled history;
    # "masked": per user, predict a random mask_share of the items from the rest (full
    # softmax only; one user vector per user, so about mask_share * items-per-user cheaper);
    # "multinomial": per user, predict all the items from the history with history_dropout
    # of it dropped (Mult-DAE, Liang et al. 2018; full softmax only).
    examples: str = "masked"
    mask_share: float = 0.2
    patience: int = 10  # evaluations without a better validation Recall@k before stopping
    eval_every: int = 1  # epochs between validations
    lr_patience: int = 0  # multiply the lr by lr_decay after this many stale evaluations; 0: never
    lr_decay: float = 0.5
    k: int = 10  # cut-off of the early-stopping metric
    # Validate on a seeded sample of this many users (0: all). Ranking every item for every
    # user is (U x I) dot products: at 1M x 1M that is hours per validation.
    eval_users: int = 0
    # 0: off. Otherwise validate, and keep, an exponential moving average of the weights
    # updated after every step with this decay (torch.optim.swa_utils' EMA), instead of the
    # weights at the step an evaluation happens to fall on.
    ema_decay: float = 0.0
    # > 1: train this many models, seeds seed, seed + 1, ..., each 1/members of the model's
    # width, and keep their sum as one model (slimrank.retrieval.ensemble; linear towers only).
    members: int = 1
    seed: int = 0
    # One thread: the ops are small, and on a shared machine more threads mostly wait.
    threads: int = 1  # torch intra-op threads while training
    progress: bool = True  # show a rich progress bar

    def __post_init__(self) -> None:
        require(self.epochs >= 1, self, "epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 2, self, "batch_size", self.batch_size, "must be >= 2")
        require(self.lr > 0, self, "lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, self, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.loss in LOSSES, self, "loss", self.loss, f"must be one of {LOSSES}")
        require(
            self.optimizer in OPTIMIZERS,
            self,
            "optimizer",
            self.optimizer,
            f"must be one of {OPTIMIZERS}",
        )
        require(
            self.optimizer != "sparse_adam" or self.weight_decay == 0.0,
            self,
            "weight_decay",
            self.weight_decay,
            "must be 0 with optimizer = 'sparse_adam' (SparseAdam has no weight decay)",
        )
        require(
            0.0 <= self.history_dropout < 1.0,
            self,
            "history_dropout",
            self.history_dropout,
            "must be in [0, 1)",
        )
        require(self.examples in EXAMPLES, self, "examples", self.examples, f"one of {EXAMPLES}")
        require(0.0 <= self.ema_decay < 1.0, self, "ema_decay", self.ema_decay, "in [0, 1)")
        require(
            self.examples == "leave_one_out" or self.loss == "softmax",
            self,
            "loss",
            self.loss,
            f"examples={self.examples!r} trains with the full softmax only",
        )
        require(
            self.examples != "masked" or self.history_dropout == 0.0,
            self,
            "history_dropout",
            self.history_dropout,
            "does not apply to masked examples: they hide mask_share of the history",
        )
        require(0.0 < self.mask_share < 1.0, self, "mask_share", self.mask_share, "in (0, 1)")
        require(self.patience >= 1, self, "patience", self.patience, "must be >= 1")
        require(self.lr_patience >= 0, self, "lr_patience", self.lr_patience, "must be >= 0")
        require(0.0 < self.lr_decay <= 1.0, self, "lr_decay", self.lr_decay, "in (0, 1]")
        require(self.eval_every >= 1, self, "eval_every", self.eval_every, "must be >= 1")
        require(self.k >= 1, self, "k", self.k, "must be >= 1")
        require(self.eval_users >= 0, self, "eval_users", self.eval_users, "must be >= 0")
        require(self.threads >= 1, self, "threads", self.threads, "must be >= 1")
        require(self.members >= 1, self, "members", self.members, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The best model (eval mode), when it was reached, and the per-evaluation log."""

    model: TwoTower
    best_epoch: int
    best_valid: dict[str, float]
    log: list[dict[str, float]]  # one row per evaluation: epoch, loss, valid metrics
    # CPU seconds of each epoch's training passes (validation excluded), for benchmarks.
    epoch_cpu_seconds: tuple[float, ...] = ()


def sampled_softmax_loss(
    logits: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the in-batch softmax loss of (B, B) ``logits``: row ``b``'s positive is column ``b``.

    ``items`` (B,) are the batch's positive items; ``log_q`` (B,) is the log sampling
    probability of each, subtracted from its column (logQ correction). A column holding the
    row's own positive item elsewhere in the batch is not counted as a negative.
    """
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = items[:, None] == items[None, :]  # (B, B)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(items)))


def bpr_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Return the mean of -log sigmoid(positive - negative) over (B,) logits."""
    return F.softplus(negative - positive).mean()


class Optimizers:
    """One or two torch optimizers stepped together (SparseAdam for the embedding tables,
    AdamW for the rest), with the zero_grad / step / param_groups of one."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]


def make_optimizer(model: TwoTower, config: TrainConfig) -> Optimizers:
    """Return the optimizer ``config.optimizer`` names for ``model``.

    ``"sparse_adam"`` switches every embedding table of ``model`` to sparse gradients (this
    changes how gradients are built, not the weights or what is saved).
    """
    if config.optimizer == "adamw":
        return Optimizers(
            torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        )
    tables = [
        m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    ]
    for table in tables:
        table.sparse = True
    sparse_ids = {id(t.weight) for t in tables}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids and p.requires_grad]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=config.lr)]
    if dense:
        optimizers.append(torch.optim.AdamW(dense, lr=config.lr, weight_decay=0.0))
    return Optimizers(*optimizers)


def evaluate_model(
    model: TwoTower,
    split: Split,
    view: str = "valid",
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
    ks: tuple[int, ...] = (10,),
    max_users: int = 0,
) -> dict[str, float]:
    """Return the protocol's full-ranking metrics of ``model`` on the ``view`` part.

    ``view="valid"``: user vectors pool the training items, which are excluded from ranking;
    ``"test"``: they pool training and validation items, both excluded. ``max_users`` > 0:
    on a seeded sample of that many users.
    """
    if view not in ("valid", "test"):
        raise ValueError(f"view={view!r}: expected 'valid' or 'test'")
    history = history_for(split, view, model.config.max_history)  # type: ignore[arg-type]
    if view == "valid":
        truth, exclude = split.valid_matrix(), split.seen_for_valid()
    else:
        truth, exclude = split.test_matrix(), split.seen_for_test()
    ranked = evaluated_users(truth, max_users)  # the users evaluate_full_ranking ranks
    user_vecs, item_vecs = export_embeddings(
        model, history, user_features, item_features, users=ranked
    )

    def score(users: np.ndarray) -> np.ndarray:
        return user_vecs[np.searchsorted(ranked, users)] @ item_vecs.T

    return evaluate_full_ranking(score, truth, exclude, ks, max_users=max_users)


def train_two_tower(
    model_config: TwoTowerConfig,
    config: TrainConfig,
    split: Split,
    user_features: FeatureTable | None = None,
    item_features: FeatureTable | None = None,
) -> TrainResult:
    """Train on ``split.train``, validate on ``split.valid``, return the best model."""
    if (model_config.n_users, model_config.n_items) != (split.n_users, split.n_items):
        raise ValueError(
            f"model is for {model_config.n_users} users x {model_config.n_items} items, "
            f"the split has {split.n_users} x {split.n_items}"
        )
    if len(split.train) == 0:
        raise ValueError("the training split is empty")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if config.members > 1:
            return _train_members(model_config, config, split, user_features, item_features)
        return _train(model_config, config, split, user_features, item_features)
    finally:
        torch.set_num_threads(threads)


def _train_members(
    model_config: TwoTowerConfig,
    config: TrainConfig,
    split: Split,
    user_features: FeatureTable | None,
    item_features: FeatureTable | None,
) -> TrainResult:
    """Train ``config.members`` models, one seed each, and return their sum as one model.

    ``best_epoch`` is the latest of the members' best epochs, ``best_valid`` the sum's own
    validation metrics, and each ``log`` row names its ``member``.
    """
    from slimrank.retrieval.ensemble import concat_two_towers, member_config

    one = member_config(model_config, config.members)
    results = []
    for j in range(config.members):
        log.info("two-tower member %d of %d (seed %d)", j + 1, config.members, config.seed + j)
        member = dataclasses.replace(config, members=1, seed=config.seed + j)
        results.append(train_two_tower(one, member, split, user_features, item_features))
    model = concat_two_towers([r.model for r in results])
    valid = _validate(model, config, split, user_features, item_features)
    return TrainResult(
        model=model,
        best_epoch=max(r.best_epoch for r in results),
        best_valid=valid,
        log=[{**row, "member": float(j)} for j, r in enumerate(results) for row in r.log],
        epoch_cpu_seconds=tuple(t for r in results for t in r.epoch_cpu_seconds),
    )


def _validate(
    model: TwoTower,
    config: TrainConfig,
    split: Split,
    user_features: FeatureTable | None,
    item_features: FeatureTable | None,
) -> dict[str, float]:
    """Return ``model``'s validation metrics at the early-stopping cut-off and user sample."""
    return evaluate_model(
        model,
        split,
        "valid",
        user_features,
        item_features,
        ks=(config.k,),
        max_users=config.eval_users,
    )


def _train(
    model_config: TwoTowerConfig,
    config: TrainConfig,
    split: Split,
    user_features: FeatureTable | None,
    item_features: FeatureTable | None,
) -> TrainResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TwoTower(model_config)
    optimizer = make_optimizer(model, config)
    ema = None
    if config.ema_decay > 0:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    scored = model if ema is None else ema.module  # what is validated and kept

    def step(loss: torch.Tensor) -> float:
        """Take one optimizer step on ``loss`` (and the average's), return the loss."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        return float(loss.detach())

    history = UserHistory.from_interactions(split.train, split.n_users, model_config.max_history)
    ufeat = None
    if not model_config.user_features.empty:
        ufeat = feature_tensors(_need(user_features, "user"), model_config.user_features)
    ifeat = None
    if not model_config.item_features.empty:
        ifeat = feature_tensors(_need(item_features, "item"), model_config.item_features)
    popularity = item_popularity(split.train, split.n_items)
    log_q = torch.as_tensor(np.log(np.maximum(popularity, 1.0) / popularity.sum()))  # (I,)
    all_items = torch.arange(split.n_items)
    # The training examples, grouped by user: each batch holds whole users.
    targets = UserHistory.from_interactions(split.train, split.n_users)

    best_recall, best_epoch, best_valid, best_state = -1.0, 0, {}, None
    evals: list[dict[str, float]] = []
    epoch_cpu: list[float] = []
    stale = 0
    metric = f"recall@{config.k}"
    columns = (
        TextColumn("two-tower"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, disable=not config.progress) as progress:
        task = progress.add_task("train", total=config.epochs, status="")
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, batches = 0.0, 0
            cpu_start = time.process_time()
            groups = list(_user_batches(targets, config.batch_size, rng))
            # A tenth of an epoch at a time in the log: at 1M users an epoch is 7,800
            # batches and the bar (one tick per epoch) shows nothing for many minutes.
            marks = set(np.linspace(0, len(groups), 11)[1:].astype(int).tolist())
            for group in groups:
                if batches in marks and batches > 0:
                    log.info(
                        "epoch %d: %d/%d batches, loss %.4f, %.0f s CPU",
                        epoch,
                        batches,
                        len(groups),
                        total / batches,
                        time.process_time() - cpu_start,
                    )
                if config.examples != "leave_one_out":
                    loss_fn = _masked_loss if config.examples == "masked" else _multinomial_loss
                    share = (
                        config.mask_share if config.examples == "masked" else config.history_dropout
                    )
                    loss = loss_fn(model, targets, group, ufeat, ifeat, all_items, share, rng)
                    total += step(loss)
                    batches += 1
                    continue
                items_np, offsets = targets.bags(group)  # every training item of the group
                rows = bag_rows(offsets, len(items_np))  # (B,) position of each user in group
                users, items = torch.as_tensor(group[rows]), torch.as_tensor(items_np)
                pooled = None
                if model_config.use_history:
                    pooled = _pooled_history(
                        model, history, group, rows, items_np, config.history_dropout, rng
                    )
                user_vecs = model.user_vectors_pooled(
                    users, None if ufeat is None else take_rows(ufeat, users), pooled
                )  # (B, d)
                if config.loss == "softmax":
                    item_vecs = model.item_vectors(all_items, ifeat)  # (I, d)
                    logits = model.logits(user_vecs, item_vecs, all_items)  # (B, I)
                    loss = F.cross_entropy(logits, items)
                elif config.loss == "sampled_softmax":
                    feats = None if ifeat is None else take_rows(ifeat, items)
                    item_vecs = model.item_vectors(items, feats)  # (B, d)
                    logits = model.logits(user_vecs, item_vecs, items)  # (B, B)
                    correction = log_q[items] if config.logq else None
                    loss = sampled_softmax_loss(logits, items, correction)
                else:
                    negatives = torch.as_tensor(rng.integers(0, split.n_items, len(items)))
                    both = torch.cat([items, negatives])
                    feats = None if ifeat is None else take_rows(ifeat, both)
                    pos_vecs, neg_vecs = model.item_vectors(both, feats).split(len(items))
                    loss = bpr_loss(
                        model.pair_logits(user_vecs, pos_vecs, items),
                        model.pair_logits(user_vecs, neg_vecs, negatives),
                    )
                total += step(loss)
                batches += 1
            epoch_cpu.append(time.process_time() - cpu_start)
            mean_loss = total / batches
            status = f"loss {mean_loss:.4f}"
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                valid = _validate(scored, config, split, user_features, item_features)
                evals.append({"epoch": float(epoch), "loss": mean_loss, **valid})
                log.info(
                    "epoch %d loss %.4f valid %s %.4f", epoch, mean_loss, metric, valid[metric]
                )
                if valid[metric] > best_recall:
                    best_recall, best_epoch, best_valid = valid[metric], epoch, valid
                    best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
                    stale = 0
                else:
                    stale += 1
                    if config.lr_patience and stale % config.lr_patience == 0:
                        for group in optimizer.param_groups():
                            group["lr"] *= config.lr_decay
                        log.info("lr x %g after %d stale evaluations", config.lr_decay, stale)
                status += (
                    f" | valid {metric} {valid[metric]:.4f} (best {best_recall:.4f} @ {best_epoch})"
                )
            progress.update(task, advance=1, status=status)
            if stale >= config.patience:
                log.info("early stop at epoch %d, best epoch %d", epoch, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        best_epoch=best_epoch,
        best_valid=best_valid,
        log=evals,
        epoch_cpu_seconds=tuple(epoch_cpu),
    )


def _masked_loss(
    model: TwoTower,
    targets: UserHistory,
    group: np.ndarray,
    ufeat: dict[str, torch.Tensor] | None,
    ifeat: dict[str, torch.Tensor] | None,
    all_items: torch.Tensor,
    share: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Return the full-softmax loss of predicting a random ``share`` of each user's items
    from the mean of the rest (one user vector per user, as in a denoising autoencoder).
    """
    items, offsets = targets.bags(group)  # every training item of the group
    rows = bag_rows(offsets, len(items))  # (N,)
    hidden = rng.random(len(items)) < share  # (N,) the items to predict
    log_p = _group_log_softmax(model, group, items, rows, ~hidden, ufeat, ifeat, all_items)
    if not hidden.any():
        return log_p.sum() * 0.0  # nothing to predict in this batch
    return -log_p[torch.as_tensor(rows[hidden]), torch.as_tensor(items[hidden])].mean()


def _multinomial_loss(
    model: TwoTower,
    targets: UserHistory,
    group: np.ndarray,
    ufeat: dict[str, torch.Tensor] | None,
    ifeat: dict[str, torch.Tensor] | None,
    all_items: torch.Tensor,
    drop: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Return the multinomial log-loss of all of each user's items, given the history with a
    ``drop`` share of it removed (Mult-DAE): summed over a user's items, averaged over users.

    The kept items are pooled as the whole history would be (sum / n ** history_power over
    all n items) and scaled by 1 / (1 - drop), as inverted dropout is, so that a user vector
    keeps the scale it has at evaluation, when nothing is dropped.
    """
    items, offsets = targets.bags(group)  # every training item of the group
    rows = bag_rows(offsets, len(items))  # (N,)
    kept = rng.random(len(items)) >= drop if model.config.use_history else None  # (N,)
    log_p = _group_log_softmax(
        model,
        group,
        items,
        rows,
        kept,
        ufeat,
        ifeat,
        all_items,
        counts=torch.as_tensor(targets.lengths(group)),  # (G,) the whole history's sizes
        scale=1.0 / (1.0 - drop),
    )
    picked = log_p[torch.as_tensor(rows), torch.as_tensor(items)]  # (N,)
    return -picked.sum() / len(group)


def _group_log_softmax(
    model: TwoTower,
    group: np.ndarray,
    items: np.ndarray,
    rows: np.ndarray,
    kept: np.ndarray | None,
    ufeat: dict[str, torch.Tensor] | None,
    ifeat: dict[str, torch.Tensor] | None,
    all_items: torch.Tensor,
    counts: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Return the (G, I) log-softmax over all items of the users in ``group``.

    Each user's history is the ``kept`` (N,) share of its flat ``items`` (user ``rows``),
    pooled by :meth:`TwoTower.pool_scale` over ``counts`` (default: the kept counts) and
    multiplied by ``scale``.
    """
    users = torch.as_tensor(group)
    pooled = None
    if model.config.use_history:
        if kept is None:
            raise ValueError("a model that pools a history needs the kept items")
        bag_offsets = np.zeros(len(group), dtype=np.int64)
        np.cumsum(np.bincount(rows[kept], minlength=len(group))[:-1], out=bag_offsets[1:])
        sums, kept_counts = model.user_tower.pool(
            torch.as_tensor(items[kept]), torch.as_tensor(bag_offsets)
        )
        counts = kept_counts if counts is None else counts
        pooled = model.pool_scale(sums, counts) * scale  # (G, D)
    user_vecs = model.user_vectors_pooled(
        users, None if ufeat is None else take_rows(ufeat, users), pooled
    )  # (G, d)
    item_vecs = model.item_vectors(all_items, ifeat)  # (I, d)
    return F.log_softmax(model.logits(user_vecs, item_vecs, all_items), dim=1)  # (G, I)


def _user_batches(
    targets: UserHistory, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield shuffled groups of whole users with about ``batch_size`` examples each."""
    users = rng.permutation(np.flatnonzero(targets.lengths(np.arange(targets.n_users)) > 0))
    batch = (np.cumsum(targets.lengths(users)) - 1) // batch_size  # (U,) batch of each user
    yield from np.split(users, np.flatnonzero(np.diff(batch)) + 1)


def _pooled_history(
    model: TwoTower,
    history: UserHistory,
    group: np.ndarray,
    rows: np.ndarray,
    targets: np.ndarray,
    drop: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Return the (B, D) mean history of each example with its own target item left out.

    The bags of the users in ``group`` are summed once; example ``b`` (user ``group[rows[b]]``,
    item ``targets[b]``) subtracts its target's embedding when the target is in the bag.
    """
    n_items = model.config.n_items
    bag_items, bag_offsets = history.bags(group, drop=drop, rng=rng)
    keys = np.sort(bag_rows(bag_offsets, len(bag_items)) * n_items + bag_items)
    query = rows * n_items + targets  # (B,)
    if len(keys):
        found = keys[np.minimum(np.searchsorted(keys, query), len(keys) - 1)] == query
    else:
        found = np.zeros(len(query), dtype=bool)
    tower = model.user_tower
    sums, counts = tower.pool(torch.as_tensor(bag_items), torch.as_tensor(bag_offsets))
    rows_t = torch.as_tensor(rows)
    in_bag = torch.as_tensor(found, dtype=sums.dtype)  # (B,)
    # F.embedding, not weight[targets]: indexing the weight would give a dense gradient.
    target_vecs = F.embedding(
        torch.as_tensor(targets), tower.history.weight, sparse=tower.history.sparse
    )  # (B, D)
    sums = sums[rows_t] - in_bag[:, None] * target_vecs  # (B, D)
    counts = counts[rows_t].to(sums.dtype) - in_bag  # (B,)
    return model.pool_scale(sums, counts)


def _need(table: FeatureTable | None, side: str) -> FeatureTable:
    if table is None:
        raise ValueError(f"the model reads {side} features; pass {side}_features=")
    return table
