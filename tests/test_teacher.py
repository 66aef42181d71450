"""The DCN-v2 teacher: shapes, size, FLOPs, the listwise loss, training on a planted signal,
early stopping on the pipeline metric, and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from slimrank.compression.flops import count_cost
from slimrank.ranking.candidates import Candidates, label_candidates, split_history
from slimrank.ranking.features import CandidateFeatures
from slimrank.ranking.pipeline_eval import pipeline_metrics, rank_candidates
from slimrank.ranking.teacher import (
    DCNv2,
    TeacherConfig,
    count_parameters,
    load_teacher,
    multiply_adds_per_candidate,
    save_teacher,
    teacher_scores,
)
from slimrank.ranking.train import (
    TrainConfig,
    fold_training_set,
    listwise_softmax_loss,
    procrustes_align,
    train_teacher,
)

SMALL = {"id_dim": 4, "n_cross": 2, "deep": (32, 16)}


def planted(seed: int, n_users: int = 120, n: int = 20, n_items: int = 60, f: int = 6):
    """Candidates whose relevance is a hidden feature, while the retrieval score is noise."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.permutation(n_items)[:n] for _ in range(n_users)])  # (U, N)
    items[:, -2:] = -1  # two pads per list
    x = rng.normal(size=(n_users, n, f)).astype(np.float32)  # (U, N, F)
    logit = 2.0 * x[:, :, 1] - 1.5 * x[:, :, 3] * x[:, :, 4]
    relevant = (logit > np.quantile(logit, 0.85)) & (items >= 0)
    x[items < 0] = 0.0
    users = np.arange(n_users)
    retrieval = x[:, :, 0]  # the retrieval order carries no signal
    cands = Candidates(users, items, retrieval)
    truth = sp.csr_matrix(
        (np.ones(relevant.sum()), (np.nonzero(relevant)[0], items[relevant])),
        shape=(n_users, n_items),
    )
    names = tuple(f"f{j}" for j in range(f))
    return cands, CandidateFeatures(x, names, users, items), truth


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match=r"TeacherConfig\.deep"):
        TeacherConfig(n_features=3, n_users=2, n_items=2, deep=())
    with pytest.raises(ValueError, match=r"TrainConfig\.loss='hinge'"):
        TrainConfig(loss="hinge")
    cfg = TeacherConfig(n_features=3, n_users=2, n_items=5, **SMALL)
    assert TeacherConfig.from_dict(cfg.to_dict()) == cfg


def test_default_teacher_is_large_and_its_flops_match_the_counter() -> None:
    cfg = TeacherConfig(n_features=250, n_users=943, n_items=1682)
    model = DCNv2(cfg)
    assert count_parameters(model) >= 1_000_000
    macs = multiply_adds_per_candidate(cfg)
    # torch's counter sees the matmuls (2 FLOPs per multiply-add), not the cross products.
    counted = count_cost(model, cfg.n_features).flops_per_candidate
    d = cfg.input_dim
    assert counted == 2 * (macs - cfg.n_cross * d)


def test_without_cross_layers_the_head_sees_only_the_mlp() -> None:
    # One hidden unit, weights set by hand: score = 3 * relu(x0 . w + 0.5) - 1, and nothing
    # of x0 reaches the head directly.
    cfg = TeacherConfig(n_features=2, n_users=1, n_items=1, id_dim=0, n_cross=0, deep=(1,))
    model = DCNv2(cfg).eval()
    assert model.cross is None and model.head.in_features == cfg.head_dim == 1
    with torch.no_grad():
        model.deep[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.deep[0].bias.fill_(0.5)
        model.head.weight.fill_(3.0)
        model.head.bias.fill_(-1.0)
    x = torch.tensor([[[1.0, 0.25], [0.0, 1.0]]])  # (1, 2, 2), standardization is identity
    expected = torch.tensor([[3.0 * 1.0 - 1.0, 3.0 * 0.0 - 1.0]])
    torch.testing.assert_close(model(x), expected)
    # Parameters: the Linear layers only (one hidden unit, the head) and base_scale.
    assert count_parameters(model) == (2 + 1) + (1 + 1) + 1
    wide = TeacherConfig(n_features=250, n_users=9, n_items=9, id_dim=0, n_cross=0)
    counted = count_cost(DCNv2(wide), wide.n_features).flops_per_candidate
    assert counted == 2 * multiply_adds_per_candidate(wide)


def test_scores_shape_pads_and_unknown_ids() -> None:
    torch.manual_seed(0)
    _, feats, _ = planted(0, n_users=5)
    model = DCNv2(TeacherConfig(n_features=6, n_users=5, n_items=60, **SMALL))
    scores = teacher_scores(model, feats)
    assert scores.shape == (5, 20) and scores.dtype == np.float32
    assert np.isneginf(scores[:, -2:]).all() and np.isfinite(scores[:, :-2]).all()
    # U=1 scoring equals the batch row; out-of-range ids use the unknown row.
    np.testing.assert_allclose(teacher_scores(model, feats.take(np.array([3])))[0], scores[3])
    x = torch.from_numpy(feats.values[:1])
    a = model(x, torch.tensor([[99]]), torch.full((1, 20), -1))
    b = model(x)
    torch.testing.assert_close(a, b)


def test_standardized_features_are_clipped_before_the_network() -> None:
    """With identity standardization, a feature of 100 scores as one at ``clip`` (2 here),
    and -100 as -2; within the clip the score moves."""
    torch.manual_seed(0)
    cfg = TeacherConfig(n_features=3, n_users=1, n_items=1, clip=2.0, **SMALL)
    model = DCNv2(cfg).eval()
    far = torch.tensor([[[100.0, -100.0, 0.5]]])
    at_clip = torch.tensor([[[2.0, -2.0, 0.5]]])
    torch.testing.assert_close(model(far), model(at_clip))
    assert not torch.equal(model(at_clip), model(torch.tensor([[[1.0, -2.0, 0.5]]])))


def test_listwise_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # Row 0: pad excluded, one positive: -log(e / (e + 1)). Row 1 has no positive: skipped.
    expected = -np.log(np.e / (np.e + 1.0))
    assert float(listwise_softmax_loss(scores, labels, mask)) == pytest.approx(expected)


def test_rank_candidates_skips_pads_and_keeps_retrieval_order_on_ties() -> None:
    items = np.array([[5, 3, -1, 7]])
    scores = np.array([[1.0, 2.0, 9.0, 1.0]])
    np.testing.assert_array_equal(rank_candidates(items, scores, 5), [[3, 5, 7, -1, -1]])


def test_rank_candidates_keeps_retrieval_order_on_ties_in_long_lists() -> None:
    """Ties keep column order past numpy's 16-element insertion sort (a stable sort)."""
    items = np.arange(100, 140)[None, :]  # (1, 40)
    scores = np.array([[1.0] * 20 + [2.0] * 20])
    want = [*range(120, 140), *range(100, 105)]
    np.testing.assert_array_equal(rank_candidates(items, scores, 25), [want])


def test_rank_candidates_rejects_nan_scores() -> None:
    """A NaN score (a broken ranker) is an error, not a silently arbitrary order."""
    with pytest.raises(ValueError, match="NaN"):
        rank_candidates(np.array([[1, 2]]), np.array([[0.5, np.nan]]), 2)


def test_normalization_is_fitted_on_real_candidates_only() -> None:
    """Pads (all-zero rows) do not pull the standardization's mean and std."""
    _, feats, _ = planted(5, n_users=10)
    model = DCNv2(TeacherConfig(n_features=6, n_users=10, n_items=60, **SMALL))
    model.fit_normalization(feats.values, feats.mask)
    real = feats.values[feats.mask].astype(np.float64)  # (M, F)
    np.testing.assert_allclose(model.feature_mean.numpy(), real.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(model.feature_std.numpy(), real.std(axis=0, ddof=1), rtol=1e-5)


def test_early_stopping_keeps_the_first_best_and_stops_after_patience() -> None:
    """A flat validation metric: epoch 0 stays best (a tie is no improvement), training stops
    ``patience`` epochs later, and the untrained model is what comes back."""
    cands, feats, truth = planted(6, n_users=20)
    labels = label_candidates(cands, truth)
    cfg = TeacherConfig(n_features=6, n_users=20, n_items=60, **SMALL)
    train = TrainConfig(epochs=10, batch_users=10, patience=2, lr=1e-2, seed=7)
    result = train_teacher(cfg, feats, labels, lambda _: {"ndcg@10": 0.5}, train, progress=False)
    assert [h["epoch"] for h in result.history] == [0.0, 1.0, 2.0]
    assert (result.best_epoch, result.best_metric) == (0, 0.5)
    torch.manual_seed(7)  # train_teacher's seeding, then the same untrained model
    untrained = DCNv2(cfg)
    untrained.fit_normalization(feats.values, feats.mask)
    np.testing.assert_array_equal(
        teacher_scores(result.model, feats), teacher_scores(untrained, feats)
    )


def test_teacher_beats_retrieval_order_on_a_planted_signal(tmp_path) -> None:
    cands, feats, truth = planted(1)
    v_cands, v_feats, v_truth = planted(2, n_users=60)
    labels = label_candidates(cands, truth)

    def validate(model: DCNv2) -> dict[str, float]:
        return pipeline_metrics(v_cands, teacher_scores(model, v_feats), v_truth)

    cfg = TeacherConfig(n_features=6, n_users=120, n_items=60, **SMALL)
    train = TrainConfig(epochs=8, batch_users=20, list_size=0, lr=5e-3, patience=8)
    result = train_teacher(cfg, feats, labels, validate, train, progress=False)
    baseline = pipeline_metrics(v_cands, v_cands.retrieval_score, v_truth)["ndcg@10"]
    assert result.best_metric > baseline + 0.3
    assert result.best_metric == max(h["valid_ndcg@10"] for h in result.history)
    assert result.history[0]["epoch"] == 0 and result.best_epoch > 0
    assert validate(result.model)["ndcg@10"] == pytest.approx(result.best_metric)

    save_teacher(result.model, tmp_path, feats.names, {"note": "test"})
    loaded, names = load_teacher(tmp_path)
    assert names == feats.names and loaded.config == cfg
    np.testing.assert_array_equal(
        teacher_scores(loaded, v_feats), teacher_scores(result.model, v_feats)
    )


def test_training_is_seeded() -> None:
    cands, feats, truth = planted(3, n_users=40)
    labels = label_candidates(cands, truth)
    cfg = TeacherConfig(n_features=6, n_users=40, n_items=60, **SMALL)
    train = TrainConfig(epochs=2, batch_users=8, list_size=10)
    a = train_teacher(cfg, feats, labels, None, train, progress=False).model
    b = train_teacher(cfg, feats, labels, None, train, progress=False).model
    np.testing.assert_array_equal(teacher_scores(a, feats), teacher_scores(b, feats))


def test_procrustes_recovers_a_rotation() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rot = procrustes_align(ref @ q.T, ref)
    np.testing.assert_allclose(rot, q, atol=1e-10)


def test_fold_training_set_labels_held_out_items_only() -> None:
    train = sp.random(30, 25, density=0.3, random_state=0, format="csr", dtype=np.float32)
    train.data[:] = 1.0

    def fit(history: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        _, _, vt = np.linalg.svd(history.toarray(), full_matrices=False)
        items = vt[:4].T  # (I, 4) PureSVD item factors
        return history @ items, items

    _, reference = fit(train)
    feats, labels = fold_training_set(train, fit, reference, n=25, folds=2, seed=3)
    users_with_target = int((np.diff(train.indptr) >= 2).sum())
    assert len(feats) == labels.shape[0] == 2 * users_with_target
    # Every positive is a training interaction, and with n covering the catalog every target
    # item (never in its own history, so never excluded) is among the candidates.
    dense = train.toarray()
    rows, cols = np.nonzero(labels)
    assert (dense[feats.user[rows], feats.items[rows, cols]] == 1).all()
    for fold in range(2):
        _, target = split_history(train, 0.2, 3 + fold)
        half = slice(fold * users_with_target, (fold + 1) * users_with_target)
        assert labels[half].sum() == target.nnz


def test_each_fold_lists_its_own_splits_users_candidates_and_labels() -> None:
    """Fold f's lists are split_history(seed + f)'s: one per user with a target item (a
    one-item user has none), no candidate from that fold's history, labels its target."""
    dense = sp.random(30, 25, density=0.3, random_state=1, format="csr").toarray()
    dense = (dense > 0).astype(np.float32)
    dense[0] = 0.0
    dense[0, 3] = 1.0  # user 0 has one item: history only, never a list
    train = sp.csr_matrix(dense)

    def fit(history: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        _, _, vt = np.linalg.svd(history.toarray(), full_matrices=False)
        return history @ vt[:4].T, vt[:4].T

    feats, labels = fold_training_set(train, fit, fit(train)[1], n=8, folds=2, seed=3)
    start = 0
    for fold in range(2):
        history, target = split_history(train, 0.2, 3 + fold)
        users = np.flatnonzero(np.diff(target.indptr) > 0)
        assert 0 not in users
        rows = slice(start, start + len(users))
        start += len(users)
        np.testing.assert_array_equal(feats.user[rows], users)
        items, real = feats.items[rows], feats.mask[rows]
        safe = np.where(real, items, 0)
        in_history = history.toarray()[users[:, None], safe] * real
        assert in_history.sum() == 0  # the fold's history is excluded
        np.testing.assert_array_equal(labels[rows], target.toarray()[users[:, None], safe] * real)
    assert start == len(feats)


def test_base_feature_start_ranks_by_that_feature() -> None:
    _, feats, _ = planted(4, n_users=6)
    cfg = TeacherConfig(n_features=6, n_users=6, n_items=60, base_feature=2, **SMALL)
    model = DCNv2(cfg)
    model.fit_normalization(feats.values, feats.mask)
    scores = teacher_scores(model, feats)
    real = feats.mask
    np.testing.assert_array_equal(
        np.argsort(-np.where(real, scores, -np.inf), axis=1, kind="stable"),
        np.argsort(-np.where(real, feats.values[:, :, 2], -np.inf), axis=1, kind="stable"),
    )
    with pytest.raises(ValueError, match="base_feature"):
        TeacherConfig(n_features=6, n_users=6, n_items=60, base_feature=6)
