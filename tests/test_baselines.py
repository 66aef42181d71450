"""Most-popular and EASE baselines against hand-computed metrics and a ridge reference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hand_data import interactions_of

from slimrank.cli import main
from slimrank.data.dataset import Interactions, Split, split_random
from slimrank.evaluation.baselines import EaseConfig, ease_weights
from slimrank.evaluation.peers import (
    PARTS,
    PEERS,
    Peer,
    evaluate_peer,
    fit_ease,
    fit_most_popular,
    format_params,
    score_part,
)


def _hand_split() -> Split:
    """3 users, 4 items; train popularity is i0: 3, i1: 1, i2: 1, i3: 0."""
    return Split(
        train=interactions_of([(0, 0), (0, 1), (1, 0), (2, 0), (2, 2)]),
        valid=interactions_of([(0, 2), (1, 3)]),
        test=interactions_of([(0, 3), (2, 3)]),
        n_users=3,
        n_items=4,
    )


def test_most_popular_by_hand() -> None:
    split = _hand_split()
    result = {part: score_part(fit_most_popular, {}, split, part, k=2)[0] for part in PARTS}
    # valid, top-2 after removing training items:
    #   u0 -> [i2, i3], truth {i2}: all 1, precision 0.5
    #   u1 -> [i1, i2] (tie broken by lower index), truth {i3}: all 0
    #   u2 has no validation item and is not averaged.
    valid = result["valid"]
    assert valid["users"] == 2
    assert valid["recall@2"] == pytest.approx(0.5)
    assert valid["ndcg@2"] == pytest.approx(0.5)
    assert valid["mrr@2"] == pytest.approx(0.5)
    assert valid["hit@2"] == pytest.approx(0.5)
    assert valid["precision@2"] == pytest.approx(0.25)
    # test, counts and exclusions over training and validation items (i0 3, i1 1, i2 2, i3 1):
    #   u0 -> [i3], truth {i3}: all 1, precision 0.5
    #   u2 -> [i1, i3], truth {i3} at rank 2: ndcg 1/log2(3), mrr 0.5
    test = result["test"]
    assert test["users"] == 2
    assert test["recall@2"] == pytest.approx(1.0)
    assert test["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert test["mrr@2"] == pytest.approx(0.75)
    assert test["hit@2"] == pytest.approx(1.0)
    assert test["precision@2"] == pytest.approx(0.5)


def test_ease_matches_per_item_ridge_regression() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((25, 6)) < 0.4).astype(np.float64)  # (U, I)
    l2 = 3.0
    b = ease_weights(sp.csr_matrix(x), EaseConfig(l2=l2))
    assert b.shape == (6, 6)
    np.testing.assert_array_equal(np.diag(b), 0)
    # Column j of B is the ridge regression of item j on the other items.
    for j in range(6):
        others = [k for k in range(6) if k != j]
        xo = x[:, others]
        coef = np.linalg.solve(xo.T @ xo + l2 * np.eye(5), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], coef, rtol=1e-4, atol=1e-5)
    scores = fit_ease(sp.csr_matrix(x), {"l2": l2})(np.array([3, 1]))
    np.testing.assert_allclose(scores, x[[3, 1]] @ b, rtol=1e-5, atol=1e-6)


def test_ease_config_checks_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"EaseConfig\.l2=0"):
        EaseConfig(l2=0)
    config = EaseConfig(l2=300.0)
    assert EaseConfig.from_dict(config.to_dict()) == config


def _random_split(n_users: int, n_items: int, per_user: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    # Users like items near a user-specific centre, so EASE has structure to learn.
    centre = rng.integers(0, n_items, n_users)
    offsets = rng.integers(-per_user, per_user, (n_users, per_user * 2))
    items = (centre[:, None] + offsets) % n_items  # (U, 2P)
    pairs = {(u, int(i)) for u in range(n_users) for i in items[u]}
    user, item = np.array(sorted(pairs)).T
    inter = Interactions(user, item, np.ones(len(user)), np.zeros(len(user)))
    return split_random(inter, n_users, n_items, seed=seed)


def test_ease_selected_on_validation_beats_popularity() -> None:
    split = _random_split(120, 80, 10, seed=5)
    peer = Peer("EASE", fit_ease, {"l2": (1.0, 10.0, 100.0)})
    result = evaluate_peer(peer, split)
    assert [t[0]["l2"] for t in result.trials] == [1.0, 10.0, 100.0]
    best = max(result.trials, key=lambda t: t[1])
    assert result.params == best[0] and result.valid["ndcg@10"] == pytest.approx(best[1])
    popular = evaluate_peer(Peer("most popular", fit_most_popular, {}), split)
    assert result.test["ndcg@10"] > popular.test["ndcg@10"]


def test_most_popular_evaluation_is_fast_at_ml100k_size() -> None:
    split = _random_split(943, 1682, 50, seed=1)  # ml-100k's shape, ~100k interactions
    metrics, per_user = score_part(fit_most_popular, {}, split, "test")
    assert metrics["users"] == 943 and len(per_user.users) == 943


def test_baseline_cli_on_a_logs_file(tmp_path: Path, capsys) -> None:
    """Every peer is printed with its validation-chosen row; --quick runs each grid's first
    setting only."""
    split_rows = ["user_id,item_id,timestamp"]
    rng = np.random.default_rng(3)
    for u in range(30):
        for i in sorted(set(rng.integers(0, 25, 12).tolist())):
            split_rows.append(f"u{u},i{i},{u * 100 + i}")
    path = tmp_path / "logs.csv"
    path.write_text("\n".join(split_rows) + "\n", encoding="utf-8")
    assert main(["baseline", "--dataset", str(path), "--quick"]) == 0
    out = capsys.readouterr().out
    for name in ("most popular", "EASE", "item-KNN", "RP3beta"):
        assert name in out
    assert "RecBole" not in out
    assert "train + valid" in out
    # --quick tries the first setting of each grid only: that is the one each row shows, and
    # no peer reports a range of settings tried.
    for peer in PEERS:
        first = format_params({key: values[0] for key, values in peer.grid.items()})
        assert re.search(rf"{re.escape(peer.name)} +│ {re.escape(first)} +│ valid", out), peer
    assert "settings (" not in out
