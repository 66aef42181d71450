"""Training the two-tower model on planted structure, seeding, and the retrieval CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from slimrank.cli import main
from slimrank.data.dataset import Interactions, Split, load_dataset, split_random
from slimrank.evaluation.protocol import topk_items
from slimrank.retrieval.embeddings import export_embeddings, history_for, load_embeddings
from slimrank.retrieval.train import (
    TrainConfig,
    _masked_loss,
    _multinomial_loss,
    _pooled_history,
    _user_batches,
    evaluate_model,
    train_two_tower,
)
from slimrank.retrieval.two_tower import TwoTower, TwoTowerConfig, UserHistory, load_model

N_USERS, N_ITEMS, PER_USER = 60, 40, 12


def planted(seed: int = 0) -> Interactions:
    """Two user groups, each taking items only from its own half of the catalog."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    half = N_ITEMS // 2
    for u in range(N_USERS):
        group = u % 2
        users += [u] * PER_USER
        items += list(group * half + rng.choice(half, PER_USER, replace=False))
    n = len(users)
    return Interactions(
        np.array(users), np.array(items), np.ones(n, np.float32), rng.permutation(n)
    )


def small_config(**kwargs) -> TwoTowerConfig:
    fields = {"n_users": N_USERS, "n_items": N_ITEMS, "dim": 16, "id_dim": 16, "hidden": (32,)}
    return TwoTowerConfig(**{**fields, **kwargs})


def in_group_share(model: TwoTower, split, k: int = 5) -> float:
    """Return the share of each user's top-k unseen items that lie in the user's own half."""
    user_vecs, item_vecs = export_embeddings(model, history_for(split, "valid"))
    top = topk_items(user_vecs @ item_vecs.T, k, split.seen_for_valid())  # (U, k)
    group = np.arange(N_USERS)[:, None] % 2
    return float(np.mean(top // (N_ITEMS // 2) == group))


@pytest.mark.parametrize(
    ("loss", "examples"),
    [
        ("softmax", "leave_one_out"),
        ("sampled_softmax", "leave_one_out"),
        ("bpr", "leave_one_out"),
        ("softmax", "masked"),
        ("softmax", "multinomial"),
    ],
)
def test_training_lowers_the_loss_and_recovers_the_planted_groups(loss, examples):
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(
        epochs=20,
        batch_size=128,
        lr=1e-2,
        loss=loss,
        examples=examples,
        patience=20,
        eval_every=4,
        seed=0,
        progress=False,
    )
    # Ids off: the groups must come through the pooled history.
    result = train_two_tower(small_config(use_user_id=False), config, split)
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    # About 12 * 0.8 of a user's 20 own items are seen, leaving ~10 own among ~30 unseen:
    # a random ranking puts ~1/3 of its top 5 in the user's half.
    assert in_group_share(result.model, split) > 0.9
    assert result.best_valid["recall@10"] == max(row["recall@10"] for row in result.log)
    assert result.best_valid["recall@10"] > 0.5


def test_early_stopping_keeps_the_best_epoch():
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(epochs=40, batch_size=64, lr=5e-2, patience=2, seed=0, progress=False)
    result = train_two_tower(small_config(), config, split)
    epochs = [int(row["epoch"]) for row in result.log]
    best_row = next(row for row in result.log if int(row["epoch"]) == result.best_epoch)
    assert epochs[-1] == 40 or epochs[-1] - result.best_epoch == 2
    # The returned model is the best epoch's, not the last one's.
    again = evaluate_model(result.model, split, "valid")
    assert again["recall@10"] == pytest.approx(best_row["recall@10"])


@pytest.mark.parametrize("examples", ["multinomial", "leave_one_out"])
def test_ema_keeps_the_moving_average_of_every_step_and_validates_it(examples):
    """The kept model is the EMA of the weights after each step (a hand loop over the same
    seeded run without EMA), and its validation row is that model's."""
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    decay = 0.8
    options = {"epochs": 1, "batch_size": 64, "seed": 3, "progress": False}
    options["examples"] = examples
    steps: list[list[torch.Tensor]] = []  # every parameter after each step, in model order

    def record(optimizer, args, kwargs):
        steps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    handle = register_optimizer_step_post_hook(record)
    try:
        raw = train_two_tower(small_config(), TrainConfig(**options), split)
    finally:
        handle.remove()
    assert len(steps) >= 3
    for value, seen in zip(raw.model.parameters(), steps[-1], strict=True):  # the run's weights
        assert torch.equal(value.detach(), seen)
    expected = steps[0]
    for step in steps[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, step, strict=True)]
    ema = train_two_tower(small_config(), TrainConfig(**options, ema_decay=decay), split)
    for value, want, last in zip(ema.model.parameters(), expected, steps[-1], strict=True):
        assert torch.allclose(value.detach(), want, atol=1e-6)
        assert not torch.allclose(value.detach(), last, atol=1e-6)
    again = evaluate_model(ema.model, split, "valid")
    assert again["recall@10"] == pytest.approx(ema.best_valid["recall@10"])


@pytest.mark.parametrize(
    "options", [{"examples": "masked"}, {"examples": "leave_one_out", "history_dropout": 0.2}]
)
def test_seeded_runs_are_identical_and_seeds_differ(options):
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)

    def run(seed: int):
        config = TrainConfig(epochs=3, batch_size=64, seed=seed, progress=False, **options)
        return train_two_tower(small_config(dropout=0.1), config, split)

    first, second, other = run(7), run(7), run(8)
    assert first.log == second.log
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    weight = "item_tower.id_embedding.weight"
    assert not torch.equal(first.model.state_dict()[weight], other.model.state_dict()[weight])


def test_training_pools_the_history_without_the_target():
    torch.manual_seed(0)
    model = TwoTower(small_config())
    logs = Interactions(
        np.array([0, 0, 0, 3]), np.array([1, 4, 5, 2]), np.ones(4, np.float32), np.arange(4)
    )
    history = UserHistory.from_interactions(logs, N_USERS)
    group = np.array([3, 0])
    rows = np.array([1, 1, 0, 1])  # examples: (0, 4), (0, 9 not in history), (3, 2), (0, 1)
    targets = np.array([4, 9, 2, 1])
    rng = np.random.default_rng(0)
    got = _pooled_history(model, history, group, rows, targets, 0.0, rng).detach()
    table = model.user_tower.history.weight.detach()
    expected = torch.stack(
        [
            table[[1, 5]].mean(0),
            table[[1, 4, 5]].mean(0),
            torch.zeros(table.shape[1]),  # user 3's only item is the target
            table[[4, 5]].mean(0),
        ]
    )
    torch.testing.assert_close(got, expected)


def _hand_config(**extra: object) -> TwoTowerConfig:
    """4 users, 6 items, linear 3-wide towers, no normalization: small enough to check by hand."""
    base = {"projection": False, "normalize": False, "temperature": 1.0}
    return TwoTowerConfig(n_users=4, n_items=6, dim=3, id_dim=3, **{**base, **extra})


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_multinomial_loss_matches_a_by_hand_reference(drop):
    """Mult-DAE: every item of the user is a target; the input keeps a 1 - drop share of the
    history, pooled as sum / sqrt(n) over the whole history and scaled by 1 / (1 - drop)."""
    torch.manual_seed(0)
    config = _hand_config(item_bias=True, history_power=0.5)
    model = TwoTower(config)
    with torch.no_grad():
        model.item_bias.weight.copy_(torch.linspace(-1, 1, 6)[:, None])
    logs = Interactions(
        np.array([0, 0, 0, 0, 2, 2]),
        np.array([1, 4, 5, 0, 2, 3]),
        np.ones(6, np.float32),
        np.arange(6),
    )
    targets = UserHistory.from_interactions(logs, 4)
    group = np.array([2, 0])
    got = _multinomial_loss(
        model, targets, group, None, None, torch.arange(6), drop, np.random.default_rng(5)
    )
    # The same draws, by hand: the bags of users 2 then 0, oldest first.
    bags = [[2, 3], [1, 4, 5, 0]]
    kept = np.random.default_rng(5).random(6) >= drop
    table = model.user_tower.history.weight
    items = model.item_tower.id_embedding.weight
    bias = model.item_bias.weight[:, 0]
    total = torch.zeros(())
    start = 0
    for bag in bags:
        keep = [item for item, k in zip(bag, kept[start : start + len(bag)], strict=True) if k]
        start += len(bag)
        pooled = table[keep].sum(0) / np.sqrt(len(bag)) / (1 - drop)
        log_p = torch.log_softmax(items @ pooled + bias, dim=0)
        total = total - log_p[bag].sum()
    torch.testing.assert_close(got, total / 2)


@pytest.mark.parametrize("logq", [True, False])
def test_sampled_softmax_training_loss_is_the_in_batch_loss_with_log_q(logq):
    """One batch, one epoch: the logged loss is the initial model's in-batch softmax over the
    batch's positives, each column less the log of its item's training share when ``logq``,
    by a plain loop (each example pools the user's other items)."""
    train = Interactions(
        np.array([0, 0, 0, 1, 1, 2, 2, 3, 3]),
        np.array([0, 1, 2, 0, 1, 0, 3, 0, 4]),
        np.ones(9, np.float32),
        np.arange(9),
    )
    split = Split(
        train=train,
        valid=Interactions(np.array([1]), np.array([5]), np.ones(1, np.float32), np.array([9])),
        test=Interactions(np.array([2]), np.array([5]), np.ones(1, np.float32), np.array([10])),
        n_users=4,
        n_items=6,
    )
    config = _hand_config(init_std=0.5)
    options = {"epochs": 1, "batch_size": 100, "examples": "leave_one_out", "progress": False}
    train_config = TrainConfig(loss="sampled_softmax", logq=logq, seed=4, **options)
    result = train_two_tower(config, train_config, split)
    torch.manual_seed(4)
    model = TwoTower(config)  # the weights the first (only) step starts from
    table = model.user_tower.history.weight.detach().numpy()
    items = model.item_tower.id_embedding.weight.detach().numpy()
    pop = np.bincount(train.item, minlength=6)
    losses = []
    for b in range(9):
        u, i = train.user[b], train.item[b]
        others = [j for v, j in zip(train.user, train.item, strict=True) if v == u and j != i]
        user = table[others].mean(0) if others else np.zeros(3)
        row = []
        for c in range(9):
            if c == b or train.item[c] != i:
                logit = float(user @ items[train.item[c]])
                row.append(logit - np.log(pop[train.item[c]] / 9) if logq else logit)
            if c == b:
                positive = row[-1]
        losses.append(np.log(np.sum(np.exp(row))) - positive)
    assert result.log[0]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_masked_loss_matches_a_by_hand_reference():
    """Masked examples: the hidden share of each user's items are targets, predicted from the
    mean of the rest; the loss is the mean of their -log softmax over every target."""
    torch.manual_seed(0)
    config = TwoTowerConfig(
        n_users=4, n_items=6, dim=3, id_dim=3, projection=False, normalize=False, temperature=1.0
    )
    model = TwoTower(config)
    logs = Interactions(
        np.array([0, 0, 0, 0, 2, 2, 2]),
        np.array([1, 4, 5, 0, 2, 3, 1]),
        np.ones(7, np.float32),
        np.arange(7),
    )
    targets = UserHistory.from_interactions(logs, 4)
    group = np.array([2, 0])
    got = _masked_loss(
        model, targets, group, None, None, torch.arange(6), 0.4, np.random.default_rng(3)
    )
    bags = [[2, 3, 1], [1, 4, 5, 0]]  # users 2 then 0, oldest first
    hidden = np.random.default_rng(3).random(7) < 0.4
    assert 0 < hidden.sum() < 7
    table = model.user_tower.history.weight
    items = model.item_tower.id_embedding.weight
    picked = []
    start = 0
    for bag in bags:
        mask = hidden[start : start + len(bag)]
        start += len(bag)
        rest = [item for item, h in zip(bag, mask, strict=True) if not h]
        pooled = table[rest].mean(0) if rest else torch.zeros(3)
        log_p = torch.log_softmax(items @ pooled, dim=0)
        picked += [log_p[item] for item, h in zip(bag, mask, strict=True) if h]
    torch.testing.assert_close(got, -torch.stack(picked).mean())


def test_stale_evaluations_decay_the_lr_every_lr_patience_and_threads_are_restored():
    """A learning rate too small to move the ranking: every evaluation after the first is
    stale, and the lr halves after each second one (epochs 4 and 6 step at half, a quarter).
    The caller's torch thread count is back after training on one thread."""
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(
        epochs=6, batch_size=10_000, lr=1e-9, lr_patience=2, lr_decay=0.5, seed=0, progress=False
    )
    rates: list[float] = []

    def record(optimizer, args, kwargs):
        rates.append(optimizer.param_groups[0]["lr"])

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    handle = register_optimizer_step_post_hook(record)
    try:
        result = train_two_tower(small_config(hidden=()), config, split)
        assert torch.get_num_threads() == 2
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert len({row["recall@10"] for row in result.log}) == 1  # nothing improved
    # One batch (one step) an epoch; the lr decays after the evaluations of epochs 3 and 5.
    assert rates == pytest.approx([1e-9] * 3 + [0.5e-9] * 2 + [0.25e-9])


def test_test_metrics_exclude_the_train_and_valid_items():
    """One user, train item 0, valid 1, test 2; the model scores 0 > 1 > 2 > 3. The test
    view excludes 0 and 1, so its top 1 is the test item; the valid view excludes only 0."""
    config = TwoTowerConfig(
        n_users=1, n_items=4, dim=2, id_dim=2, projection=False, normalize=False
    )
    model = TwoTower(config).eval()
    with torch.no_grad():
        model.user_tower.history.weight.copy_(torch.tensor([[1.0, 0.0]] * 4))
        scores = torch.tensor([[5.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
        model.item_tower.id_embedding.weight.copy_(scores)

    def part(item: int) -> Interactions:
        return Interactions(
            np.array([0]), np.array([item]), np.ones(1, np.float32), np.array([item])
        )

    split = Split(train=part(0), valid=part(1), test=part(2), n_users=1, n_items=4)
    assert evaluate_model(model, split, "valid", ks=(1,))["recall@1"] == 1.0
    assert evaluate_model(model, split, "test", ks=(1,))["recall@1"] == 1.0


def test_batches_hold_every_user_with_training_items_once_and_no_one_else():
    """Users 1 and 4 have no training items: no batch holds them (a multinomial batch
    averages over its users)."""
    logs = Interactions(
        np.array([0, 0, 2, 3, 3, 3, 5]), np.arange(7), np.ones(7, np.float32), np.arange(7)
    )
    targets = UserHistory.from_interactions(logs, 6)
    groups = list(_user_batches(targets, 2, np.random.default_rng(0)))
    assert sorted(np.concatenate(groups).tolist()) == [0, 2, 3, 5]
    assert all(len(group) for group in groups)


def test_training_rejects_a_model_of_another_shape():
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    with pytest.raises(ValueError, match="users"):
        train_two_tower(TwoTowerConfig(n_users=N_USERS + 1, n_items=N_ITEMS), TrainConfig(), split)


def test_cli_trains_evaluates_and_writes_item_embeddings(tmp_path, capsys):
    logs = planted(1)
    frame = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in logs.user],
            "item_id": [f"i{i}" for i in logs.item],
            "timestamp": logs.timestamp + 1_600_000_000,
        }
    )
    path = tmp_path / "logs.csv"
    frame.to_csv(path, index=False)
    run = tmp_path / "run"
    args = ["--dataset", str(path), "--out", str(run), "--epochs", "3", "--dim", "8"]
    assert main(["retrieval", "train", *args, "--no-progress", "--no-features"]) == 0
    assert main(["retrieval", "evaluate", "--model", str(run)]) == 0
    assert "test" in capsys.readouterr().out

    dataset = load_dataset(str(path))
    embeddings = load_embeddings(run)
    # --dim 8 plus one column for the item bias (users get a 1 there).
    assert embeddings.item.shape == (dataset.n_items, 9)
    assert embeddings.item_ids.tolist() == dataset.items.ids.tolist()
    # The files hold the saved model's vectors, users pooling train + valid (the test view).
    split = split_random(dataset.interactions, dataset.n_users, dataset.n_items, seed=2020)
    model = load_model(run)
    user_vecs, item_vecs = export_embeddings(model, history_for(split, "test"))
    np.testing.assert_array_equal(embeddings.item, item_vecs)
    np.testing.assert_array_equal(embeddings.user, user_vecs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["ndcg@10"] == pytest.approx(
        evaluate_model(model, split, "test")["ndcg@10"]
    )
    assert json.loads((run / "train.json").read_text())["split_seed"] == 2020


def test_cli_defaults_are_the_documented_recipe(tmp_path):
    """Without flags: multinomial examples with half the history dropped, linear towers
    without projection, unnormalized, item bias, sum / sqrt(n) pooling. ``--hidden`` implies
    a projection; other examples drop nothing by default."""
    logs = planted(2)
    frame = pd.DataFrame(
        {"user_id": logs.user, "item_id": logs.item, "timestamp": logs.timestamp + 1_600_000_000}
    )
    path = tmp_path / "logs.csv"
    frame.to_csv(path, index=False)

    def train(run: str, *flags: str) -> tuple[dict, dict]:
        args = ["--dataset", str(path), "--out", str(tmp_path / run), "--epochs", "1"]
        assert main(["retrieval", "train", *args, "--dim", "4", "--no-progress", *flags]) == 0
        model = json.loads((tmp_path / run / "model_config.json").read_text())
        return model, json.loads((tmp_path / run / "train.json").read_text())["train_config"]

    model, config = train("default")
    assert (config["examples"], config["history_dropout"]) == ("multinomial", 0.5)
    assert (model["projection"], model["hidden"], model["normalize"]) == (False, [], False)
    assert (model["item_bias"], model["history_power"], model["temperature"]) == (True, 0.5, 1.0)
    model, config = train("mlp", "--hidden", "8", "--examples", "masked")
    assert (model["projection"], model["hidden"]) == (True, [8])
    assert (config["examples"], config["history_dropout"]) == ("masked", 0.0)


def test_cli_reports_a_bad_flag_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "logs.csv"
    pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": [1, 2]}).to_csv(
        path, index=False
    )
    args = ["retrieval", "train", "--dataset", str(path), "--out", str(tmp_path / "run")]
    assert main([*args, "--loss", "bpr"]) == 2  # bpr needs leave_one_out examples
    assert "TrainConfig.loss='bpr'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's usage error, before any data is read
        main([*args, "--hidden", "16,abc"])
    assert info.value.code == 2
    assert "argument --hidden: not comma-separated integers: '16,abc'" in capsys.readouterr().err


def test_an_epoch_logs_its_progress_a_tenth_at_a_time(caplog):
    """At 1M users an epoch is thousands of batches: the log says how far it is."""
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(
        epochs=2, batch_size=16, loss="sampled_softmax", examples="leave_one_out", progress=False
    )
    with caplog.at_level("INFO", logger="slimrank.retrieval.train"):
        train_two_tower(small_config(), config, split)
    lines = [r.getMessage() for r in caplog.records if ": " in r.getMessage()]
    # 60 users x ~9.6 training items, 16 per batch of whole users: about 36 batches an epoch.
    for epoch in (1, 2):
        done = [line.split(" ")[2] for line in lines if line.startswith(f"epoch {epoch}: ")]
        assert len(done) == 9
        counts = [int(d.split("/")[0]) for d in done]
        total = int(done[0].split("/")[1])
        assert counts == sorted(counts) and 0 < counts[0] < counts[-1] < total
        assert counts == [int(total * t / 10) for t in range(1, 10)]


def test_a_sampled_evaluation_pools_only_the_sampled_users_and_scores_as_before():
    """``max_users``: the vectors of the sampled users alone, the metrics of ranking them with
    every user's vectors (the reference: export all, rank the same sample)."""
    from slimrank.evaluation.protocol import evaluate_full_ranking, evaluated_users

    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(epochs=2, batch_size=64, seed=0, progress=False)
    model = train_two_tower(small_config(), config, split).model
    history = history_for(split, "valid")
    every_user, item_vecs = export_embeddings(model, history)
    sample = evaluated_users(split.valid_matrix(), 17)
    assert len(sample) == 17
    some, same_items = export_embeddings(model, history, users=sample[::-1])
    np.testing.assert_allclose(some, every_user[sample[::-1]], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(same_items, item_vecs)
    expected = evaluate_full_ranking(
        lambda users: every_user[users] @ item_vecs.T,
        split.valid_matrix(),
        split.seen_for_valid(),
        (5, 10),
        max_users=17,
    )
    got = evaluate_model(model, split, "valid", ks=(5, 10), max_users=17)
    assert got == pytest.approx(expected) and got["users"] == 17
