"""The compression steps: students with and without distillation, pruning, int8 and the gate.

Each step reads its inputs from the steps before it, hands the training to
:mod:`slimrank.compression` (one loop, :func:`~slimrank.compression.fit.fit_epochs`, run here
or by the engine) and evaluates its ranker with the pipeline protocol on the validation and
test views (see :mod:`slimrank.pipeline.steps`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimrank.bundle.formats import read_tensors, write_json, write_tensors
from slimrank.compression.lists import standardization, standardized_lists
from slimrank.compression.scorer import bench_scorer, onnx_score_fn, score_lists
from slimrank.pipeline.config import Int8Config, PruneConfig, StudentConfig
from slimrank.pipeline.steps import evaluate_views, load_data, load_teacher_scores, load_views
from slimrank.ranking.features import CandidateFeatures
from slimrank.ranking.pipeline_eval import pipeline_metrics

if TYPE_CHECKING:
    from slimrank.compression.lists import ListData
    from slimrank.pipeline.engine import Engine


def list_data(
    feats: CandidateFeatures, labels: np.ndarray, teacher: np.ndarray, mean: Any, std: Any
) -> ListData:
    """Return the distillation lists of standardized features, labels and teacher scores."""
    return standardized_lists(feats.values, feats.mask, labels, teacher, mean, std)


log = logging.getLogger(__name__)


def _save_student(
    out: Path,
    model: Any,
    mean: np.ndarray,
    std: np.ndarray,
    extra: dict[str, Any],
    fold: bool,
) -> Path:
    """Save the student (standardized-input weights) and export it for raw features.

    ``fold`` folds the standardization into the first layer; otherwise it stays a separate
    step (see :class:`Standardized`). Returns the ONNX path.
    """
    from slimrank.compression.export import Standardized, export_onnx, save_mlp
    from slimrank.compression.flops import count_cost
    from slimrank.ranking.mlp import fold_standardization

    save_mlp(model, out / "student.safetensors")
    write_tensors(out / "standardization.safetensors", {"mean": mean, "std": std})
    if fold:
        raw = fold_standardization(model, torch.from_numpy(mean), torch.from_numpy(std))
    else:
        raw = Standardized(model, mean, std).eval()
    path = export_onnx(raw, out / "model.onnx", model.config.input_dim)
    cost = count_cost(raw, model.config.input_dim)
    write_json(out / "model.json", {"hidden": list(model.config.hidden), **cost.to_dict(), **extra})
    return path


def _valid_ndcg(views: dict, data: Any, mean: np.ndarray, std: np.ndarray, k: int) -> Any:
    """Return ``metric(model)``: validation NDCG@k of a torch student on standardized input."""
    cands, feats, _ = views["valid"]
    x = torch.from_numpy(np.where(feats.mask[..., None], (feats.values - mean) / std, 0.0))
    x = x.float()  # (U, N, F)
    truth = data.truth("valid")

    def metric(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            scores = model(x).numpy()  # (U, N)
        return pipeline_metrics(cands, scores, truth, (k,))[f"ndcg@{k}"]

    return metric


def student_step(
    config: StudentConfig,
    distill: bool,
    k: int,
    data_dir: Path,
    cand_dir: Path,
    teacher_dir: Path,
    out: Path,
    engine: Engine | None = None,
) -> None:
    """Train the student MLP from labels only (``distill=False``) or with distillation.

    The epoch is chosen on validation NDCG (see :func:`fit_on_valid`); ``engine`` may train
    it data-parallel (the Ray engine with several workers).
    """
    from slimrank.compression.distill import DistillConfig
    from slimrank.compression.fit import fit_on_valid
    from slimrank.ranking.mlp import MLPConfig, MLPRanker

    torch.manual_seed(config.seed)
    data = load_data(data_dir)
    views = load_views(cand_dir)
    _, feats, labels = views["train"]
    teacher = load_teacher_scores(teacher_dir)["train"]
    mean, std = standardization(feats.values, feats.mask)
    lists = list_data(feats, labels, teacher, mean, std)
    loss = config.distill
    if not distill:
        loss = DistillConfig(soft_weight=0.0, hard_weight=1.0, hard_loss=config.distill.hard_loss)
    student = MLPRanker(MLPConfig(input_dim=feats.values.shape[-1], hidden=config.hidden))
    metric = _valid_ndcg(views, data, mean, std, k)
    fit = config.fit()
    if engine is None:
        model, history = fit_on_valid(student, lists, loss, fit, metric)
    else:
        model, history = engine.fit_student(student, lists, loss, fit, metric)
    extra = {"epochs": history}
    path = _save_student(out, model, mean, std, extra, config.fold_standardization)
    write_json(out / "metrics.json", evaluate_views(views, data, onnx_score_fn(path), k))


def pruned_step(
    config: StudentConfig,
    prune: PruneConfig,
    k: int,
    data_dir: Path,
    cand_dir: Path,
    teacher_dir: Path,
    student_dir: Path,
    out: Path,
) -> None:
    """Prune the distilled student: drop hidden units, then prune weights while distilling.

    Magnitude sparsity ramps up over the first ``prune.ramp_epochs`` epochs; fine-tuning goes
    on at the final sparsity, and the epoch is chosen on validation NDCG among those (see
    :func:`fit_on_valid`). Fine-tuning a fixed number of epochs overfit: the students peak
    within a few epochs on ml-100k's 1,886 training lists.
    """
    from slimrank.compression.export import load_mlp
    from slimrank.compression.fit import fit_on_valid
    from slimrank.compression.pruning import (
        MagnitudePruner,
        PruningSchedule,
        fold_masks,
        sparsity_report,
    )
    from slimrank.compression.structured import prune_units

    torch.manual_seed(config.seed)
    data = load_data(data_dir)
    views = load_views(cand_dir)
    _, feats, labels = views["train"]
    teacher = load_teacher_scores(teacher_dir)["train"]
    norm = read_tensors(student_dir / "standardization.safetensors")
    mean, std = norm["mean"], norm["std"]
    lists = list_data(feats, labels, teacher, mean, std)
    student = load_mlp(student_dir / "student.safetensors")
    shrunk = (
        prune_units(student, prune.structured_fraction) if prune.structured_fraction else student
    )
    ramp_steps = prune.ramp_epochs * math.ceil(len(lists) / config.batch_size)
    frequency = max(1, ramp_steps // prune.updates)
    schedule = PruningSchedule(
        initial_sparsity=0.0,
        final_sparsity=prune.final_sparsity,
        begin_step=0,
        end_step=frequency * prune.updates,
        frequency=frequency,
    )
    pruner = MagnitudePruner(schedule) if prune.final_sparsity > 0 else None
    tune = config.fit(epochs=prune.epochs, lr=prune.lr, patience=prune.patience)
    metric = _valid_ndcg(views, data, mean, std, k)
    model, history = fit_on_valid(shrunk, lists, config.distill, tune, metric, pruner)
    model = fold_masks(model, pruner) if pruner is not None else model
    extra = {
        "sparsity": sparsity_report(model),
        "schedule": schedule.to_dict(),
        "epochs": history,
    }
    path = _save_student(out, model, mean, std, extra, config.fold_standardization)
    write_json(out / "metrics.json", evaluate_views(views, data, onnx_score_fn(path), k))


# -- int8 and the gate -------------------------------------------------------------------------


def int8_step(
    config: Int8Config,
    k: int,
    data_dir: Path,
    cand_dir: Path,
    teacher_dir: Path,
    pruned_dir: Path,
    out: Path,
) -> None:
    """Quantize the pruned student in each mode through the gate; keep the first that passes.

    The gate compares validation NDCG@k with the teacher's, and the int8 top-k of each
    validation user with the fp32 pruned student's. When no mode passes, nothing is kept as
    ``ranker.int8.onnx``; an ungated full-int8 copy (``rejected.int8.onnx``) is kept for the
    report only.
    """
    from slimrank.compression.gate import ReferenceLists, gate_int8, quantize

    data = load_data(data_dir)
    views = load_views(cand_dir)
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    metric = f"ndcg@{k}"
    teacher_valid = float(teacher_metrics["valid"][metric])
    src = pruned_dir / "model.onnx"
    v_cands, v_feats, _ = views["valid"]
    truth = data.truth("valid")
    _, t_feats, _ = views["train"]
    rows = t_feats.values[t_feats.mask]  # (M, F) real training candidates
    rng = np.random.default_rng(0)
    calibration = rows[
        np.sort(rng.choice(len(rows), min(len(rows), config.calibration_candidates), False))
    ]
    bench_x = v_feats.values[0]  # (N, F) one user's candidates, pads included as zeros

    lists = ReferenceLists(v_feats.values, v_feats.mask, k)

    def valid_metric(scorer: Any) -> float:
        return pipeline_metrics(v_cands, score_lists(scorer, v_feats.values), truth, (k,))[metric]

    decisions: dict[str, Any] = {}
    latency: dict[str, float] = {}
    for mode in config.modes:
        gate = dataclasses.replace(config.gate, mode=mode)
        decision = gate_int8(
            src, out / mode, valid_metric, teacher_valid, calibration, gate, lists=lists
        )
        record = decision.to_dict()
        record["model_path"] = f"{mode}/ranker.int8.onnx" if decision.accepted else None
        decisions[mode] = record
        if decision.accepted:
            latency[mode] = bench_scorer(
                out / mode / "ranker.int8.onnx", bench_x, config.bench_repeats
            )
    # A mode that needed fewer fp32 fallbacks is more int8; among equals the config's order
    # decides. Not the measured latency: the modes differ by a few µs, within timing noise on
    # a busy machine, and choosing by noise made the published ranker change run to run.
    chosen = (
        min(latency, key=lambda m: (len(decisions[m]["excluded_nodes"]), config.modes.index(m)))
        if latency
        else None
    )
    if chosen is not None:
        shutil.copyfile(out / chosen / "ranker.int8.onnx", out / "ranker.int8.onnx")
        final = out / "ranker.int8.onnx"
    else:
        final = out / "rejected.int8.onnx"
        quantize(config.modes[0], src, final, calibration, config.gate.quant)
    metrics = evaluate_views(views, data, onnx_score_fn(final), k)
    summary = {
        "accepted": chosen is not None,
        "mode": chosen,
        "min_ratio": config.gate.min_ratio,
        "teacher_valid": teacher_valid,
        "median_seconds": latency,
        "decisions": decisions,
        "model": final.name,
    }
    write_json(out / "gate.json", summary)
    write_json(out / "metrics.json", metrics)
