"""A seed ensemble of linear two-towers is one wider two-tower: its scores are the sum of the
members' scores, each member trained exactly as a single model with its seed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from slimrank.cli import main
from slimrank.config import ConfigError
from slimrank.data.dataset import split_random
from slimrank.pipeline.config import load_config
from slimrank.retrieval.embeddings import export_embeddings, history_for
from slimrank.retrieval.ensemble import concat_two_towers, ensemble_problem, member_config
from slimrank.retrieval.train import TrainConfig, evaluate_model, train_two_tower
from slimrank.retrieval.two_tower import TwoTower, load_model, save_model
from tests.test_two_tower_train import N_ITEMS, N_USERS, planted, small_config


def linear_config(**kwargs):
    fields = {"dim": 12, "id_dim": 12, "hidden": (), "projection": False, "normalize": False}
    fields |= {"item_bias": True, "history_power": 0.5, "init_std": 0.01, "temperature": 0.5}
    return small_config(**{**fields, **kwargs})


def scores(model, split, view="valid") -> np.ndarray:
    """Return the (U, I) scores the exported vectors give (what FAISS and the server rank)."""
    user, item = export_embeddings(model, history_for(split, view, model.config.max_history))
    return user @ item.T


def logits(model, split) -> torch.Tensor:
    """Return the (U, I) training logits of every user for every item."""
    history = history_for(split, "valid", model.config.max_history)
    items, offsets = history.bags(np.arange(N_USERS))
    with torch.no_grad():
        users = model.user_vectors(
            torch.arange(N_USERS), None, torch.as_tensor(items), torch.as_tensor(offsets)
        )
        every = torch.arange(N_ITEMS)
        return model.logits(users, model.item_vectors(every), every)


# Seeds whose members stop at different epochs, so that the best epoch is checked.
@pytest.mark.parametrize(("examples", "seed"), [("multinomial", 5), ("leave_one_out", 0)])
def test_members_are_the_single_seeded_models_and_the_sum_is_their_logits(examples, seed):
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    options = {"epochs": 8, "batch_size": 64, "progress": False, "examples": examples}
    options |= {"seed": seed, "eval_every": 1, "patience": 1, "k": 5, "eval_users": 40}
    summed = train_two_tower(linear_config(), TrainConfig(**options, members=3), split)
    singles = [
        train_two_tower(
            linear_config(dim=4, id_dim=4), TrainConfig(**{**options, "seed": s}), split
        )
        for s in (seed, seed + 1, seed + 2)
    ]
    assert summed.model.config == linear_config()
    want_logits = sum(logits(r.model, split) for r in singles)
    assert torch.allclose(logits(summed.model, split), want_logits, atol=1e-5)
    want = sum(scores(r.model, split) for r in singles)
    got = scores(summed.model, split)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    for r in singles:  # the sum is none of its members
        assert not np.allclose(got, scores(r.model, split), atol=1e-3)
    user, item = export_embeddings(summed.model, history_for(split, "valid"))
    assert user.shape[1] == item.shape[1] == 13  # 3 x 4 wide, and the item-bias column
    assert len({r.best_epoch for r in singles}) > 1  # else the next line tells nothing
    assert summed.best_epoch == max(r.best_epoch for r in singles)
    assert summed.best_valid == evaluate_model(summed.model, split, "valid", ks=(5,), max_users=40)
    assert "recall@5" in summed.best_valid and summed.best_valid["users"] == 40
    assert len(summed.epoch_cpu_seconds) == sum(len(r.log) for r in singles)
    assert [row["member"] for row in summed.log] == [
        float(j) for j, r in enumerate(singles) for _ in r.log
    ]
    assert [{k: v for k, v in row.items() if k != "member"} for row in summed.log] == [
        row for r in singles for row in r.log
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"use_user_id": True},
        {"use_user_id": True, "use_history": False, "item_bias": False},
        {"max_history": 2, "history_power": 1.0},
    ],
)
def test_concatenation_sums_the_logits_of_any_linear_towers(change):
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    members = []
    for seed, width in ((0, 3), (1, 5)):
        torch.manual_seed(seed)
        model = TwoTower(linear_config(dim=width, id_dim=width, init_std=0.3, **change))
        if model.item_bias is not None:
            torch.nn.init.normal_(model.item_bias.weight)
        members.append(model.eval())
    summed = concat_two_towers(members)
    assert summed.config == linear_config(dim=8, id_dim=8, init_std=0.3, **change)
    want = sum(logits(m, split) for m in members)
    assert torch.allclose(logits(summed, split), want, atol=1e-5)
    np.testing.assert_allclose(
        scores(summed, split), sum(scores(m, split) for m in members), atol=1e-5
    )


def test_the_sum_saves_and_loads_as_an_ordinary_two_tower(tmp_path):
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    config = TrainConfig(epochs=2, batch_size=64, progress=False, members=2)
    model = train_two_tower(linear_config(), config, split).model
    again = load_model(save_model(model, tmp_path / "model"))
    np.testing.assert_array_equal(scores(again, split, "test"), scores(model, split, "test"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"dim": 10, "id_dim": 10}, "not divisible"),
        ({"projection": True, "hidden": ()}, "linear towers"),
        ({"projection": True, "hidden": (8,)}, "linear towers"),
        ({"normalize": True}, "normalize = false"),
        ({"learn_temperature": True}, "fixed temperature"),
    ],
)
def test_a_model_that_is_not_a_sum_of_members_is_refused(change, words):
    config = linear_config(**change)
    assert words in ensemble_problem(config, 3)
    assert ensemble_problem(config, 1) == ""
    with pytest.raises(ValueError, match=words):
        member_config(config, 3)
    split = split_random(planted(), N_USERS, N_ITEMS, seed=0)
    with pytest.raises(ValueError, match=words):
        train_two_tower(config, TrainConfig(epochs=1, progress=False, members=3), split)


def test_concatenation_refuses_members_that_differ_beyond_their_width():
    a = TwoTower(linear_config(dim=4, id_dim=4))
    b = TwoTower(linear_config(dim=4, id_dim=4, history_power=1.0))
    with pytest.raises(ValueError, match="differ"):
        concat_two_towers([a, b])
    with pytest.raises(ValueError, match="no models"):
        concat_two_towers([])
    c = TwoTower(linear_config(dim=8, id_dim=8))  # other widths are fine
    assert concat_two_towers([a, c]).config.dim == 12


@pytest.mark.parametrize(
    ("two_tower", "words"),
    [
        ("dim = 64\nid_dim = 64", "not divisible"),
        ("dim = 63\nid_dim = 63\nnormalize = true", "normalize = false"),
        ("dim = 63\nid_dim = 63\nnormalize = false\nuse_features = true", "use_features = false"),
    ],
)
def test_the_pipeline_config_names_the_members_key(tmp_path, two_tower, words):
    path = tmp_path / "bad.toml"
    text = f"[two_tower]\nprojection = false\nhidden = []\n{two_tower}\n"
    path.write_text(text + "[two_tower.train]\nmembers = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "bad.toml" in message and "two_tower.train.members" in message and words in message


def test_the_cli_trains_a_sum_of_seeds_and_refuses_one_it_cannot_build(tmp_path, capsys):
    logs = planted(1)
    path = tmp_path / "logs.csv"
    pd.DataFrame({"user_id": logs.user, "item_id": logs.item, "timestamp": logs.timestamp}).to_csv(
        path, index=False
    )
    args = ["retrieval", "train", "--dataset", str(path), "--epochs", "2", "--no-progress"]
    run = tmp_path / "run"
    assert main([*args, "--out", str(run), "--dim", "8", "--members", "2"]) == 0
    record = json.loads((run / "train.json").read_text())
    assert record["train_config"]["members"] == 2
    assert {row["member"] for row in record["log"]} == {0.0, 1.0}
    assert load_model(run).config.dim == 8
    bad = tmp_path / "bad"
    assert main([*args, "--out", str(bad), "--dim", "8", "--members", "3"]) == 2
    err = capsys.readouterr().err
    assert "--members 3 with --dim 8" in err and "not divisible by members = 3" in err
    assert not bad.exists()


@pytest.mark.parametrize(
    ("two_tower", "key", "words"),
    [
        ("projection = false", "two_tower.projection", "needs hidden=()"),
        ("projection = false\nhidden = []\nid_dim = 32", "two_tower.projection", "id_dim == dim"),
        ("temperature = 0.0", "two_tower.temperature", "must be > 0"),
    ],
)
def test_a_two_tower_shape_the_model_refuses_is_named_when_the_config_loads(
    tmp_path, two_tower, key, words
):
    path = tmp_path / "shape.toml"
    path.write_text(f"[two_tower]\n{two_tower}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "shape.toml" in message and key in message and words in message
