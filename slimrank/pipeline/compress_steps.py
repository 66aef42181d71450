"""The compression steps: students with and without distillation, pruning, int8 and the gate.

Each step takes the artifacts of the steps before it (loaded by the runner), hands the training to
:mod:`slimrank.compression` (one loop, :func:`~slimrank.compression.fit.fit_epochs`, run here
or by the engine) and evaluates its ranker with the pipeline protocol on the validation and
test views (see :mod:`slimrank.pipeline.steps`). The exporter and the quantizer write ONNX
files, so each step writes its artifact into ``out``, its own directory, under the names of
:mod:`slimrank.pipeline.artifacts`, and returns it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimrank.bundle.formats import write_json
from slimrank.compression.cpu import cpu_features
from slimrank.compression.lists import standardization, standardized, standardized_lists
from slimrank.compression.scorer import onnx_score_fn, score_lists
from slimrank.pipeline import artifacts
from slimrank.pipeline.artifacts import (
    CandidatesArtifact,
    DataArtifact,
    Int8Artifact,
    PrecisionArtifact,
    SeedsArtifact,
    StudentArtifact,
    TeacherArtifact,
)
from slimrank.pipeline.config import Int8Config, PruneConfig, StudentConfig
from slimrank.pipeline.steps import evaluate_views
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

    save_mlp(model, StudentArtifact.weights_path(out))
    artifacts.save_standardization(out, mean, std)
    if fold:
        raw = fold_standardization(model, torch.from_numpy(mean), torch.from_numpy(std))
    else:
        raw = Standardized(model, mean, std).eval()
    path = export_onnx(raw, artifacts.ranker_path(out), model.config.input_dim)
    cost = count_cost(raw, model.config.input_dim)
    write_json(
        StudentArtifact.info_path(out),
        {"hidden": list(model.config.hidden), **cost.to_dict(), **extra},
    )
    return path


def _valid_ndcg(views: dict, data: Any, mean: np.ndarray, std: np.ndarray, k: int) -> Any:
    """Return ``metric(model)``: validation NDCG@k of a torch student on standardized input."""
    cands, feats, _ = views["valid"]
    x = torch.from_numpy(standardized(feats.values, feats.mask, mean, std))  # (U, N, F)
    truth = data.truth("valid")

    def metric(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            scores = model(x).numpy()  # (U, N)
        return pipeline_metrics(cands, scores, truth, (k,))[f"ndcg@{k}"]

    return metric


STUDENT_KINDS = ("plain", "distill", "pseudo")


def student_step(
    config: StudentConfig,
    kind: str,
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    out: Path,
    engine: Engine | None = None,
    pseudo_top_k: int = 10,
) -> StudentArtifact:
    """Train the student MLP from labels only (``plain``), with soft-label distillation
    (``distill``), or on the teacher's top ``pseudo_top_k`` per list as labels (``pseudo``).

    The epoch is chosen on validation NDCG (see :func:`~slimrank.compression.fit.fit_epochs`);
    ``engine`` may train it data-parallel (the Ray engine with several workers).
    """
    from slimrank.compression.fit import fit_on_valid

    views = candidates.views
    lists, mean, std, loss = _student_inputs(config, kind, candidates, teacher, pseudo_top_k)
    log.info("student %s: training on %d torch threads", kind, torch.get_num_threads())
    torch.manual_seed(config.seed)
    student = _new_student(config, lists)
    metric = _valid_ndcg(views, data, mean, std, k)
    fit = config.fit()
    if engine is None:
        model, history = fit_on_valid(student, lists, loss, fit, metric)
    else:
        model, history = engine.fit_student(student, lists, loss, fit, metric)
    extra = {"epochs": history}
    path = _save_student(out, model, mean, std, extra, config.fold_standardization)
    artifacts.save_metrics(out, evaluate_views(views, data, onnx_score_fn(path), k))
    return StudentArtifact(out)


def _new_student(config: StudentConfig, lists: ListData) -> torch.nn.Module:
    from slimrank.ranking.mlp import MLPConfig, MLPRanker

    return MLPRanker(MLPConfig(input_dim=lists.features.shape[-1], hidden=config.hidden))


def _student_inputs(
    config: StudentConfig,
    kind: str,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    pseudo_top_k: int,
) -> tuple[ListData, np.ndarray, np.ndarray, Any]:
    """Return the training lists, standardization and loss of a student kind."""
    from slimrank.compression.distill import DistillConfig, pseudo_label_config, pseudo_labels

    if kind not in STUDENT_KINDS:
        raise ValueError(f"student kind {kind!r}: one of {STUDENT_KINDS}")
    _, feats, labels = candidates.views["train"]
    mean, std = standardization(feats.values, feats.mask)
    lists = list_data(feats, labels, teacher.scores["train"], mean, std)
    hard = config.distill.hard_loss
    loss = config.distill
    if kind == "plain":
        loss = DistillConfig(soft_weight=0.0, hard_weight=1.0, hard_loss=hard)
    elif kind == "pseudo":
        chosen = pseudo_labels(lists.teacher_scores, lists.mask, pseudo_top_k)
        lists = dataclasses.replace(lists, labels=chosen)
        loss = pseudo_label_config(hard)
    return lists, mean, std, loss


def seeds_step(
    config: StudentConfig,
    seeds: tuple[int, ...],
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    out: Path,
) -> SeedsArtifact:
    """Train the distilled student once per seed in ``seeds`` (the rest of its recipe fixed)
    and record each one's validation and test metrics (``seeds.json``): its seed spread. The
    student's own ``config.seed`` is skipped: that student is ``student_distill``."""
    from slimrank.compression.fit import fit_on_valid

    views = candidates.views
    lists, mean, std, loss = _student_inputs(config, "distill", candidates, teacher, 10)
    metric = _valid_ndcg(views, data, mean, std, k)
    records = {}
    for seed in (s for s in seeds if s != config.seed):  # config.seed is student_distill
        seeded = dataclasses.replace(config, seed=seed)
        torch.manual_seed(seed)
        student = _new_student(seeded, lists)
        model, _ = fit_on_valid(student, lists, loss, seeded.fit(), metric)
        seed_dir = SeedsArtifact.seed_dir(out, seed)
        path = _save_student(seed_dir, model, mean, std, {}, config.fold_standardization)
        records[str(seed)] = evaluate_views(views, data, onnx_score_fn(path), k)
    SeedsArtifact.save_records(out, records)
    return SeedsArtifact(out)


PRUNE_METHODS = ("magnitude", "taylor", "l1")


def pruned_step(
    config: StudentConfig,
    prune: PruneConfig,
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    student: StudentArtifact,
    out: Path,
    method: str = "magnitude",
    l1_penalty: float = 0.0,
) -> StudentArtifact:
    """Prune the distilled student: drop hidden units, then prune weights while distilling.

    ``method`` chooses which weights go: ``magnitude`` (the smallest), ``taylor`` (the least
    first-order Taylor importance ``|w * grad|`` gathered during fine-tuning), or ``l1`` (an
    L1 penalty of weight ``l1_penalty`` on the loss throughout fine-tuning, and the smallest
    weights masked once, at the end of the ramp; see
    :mod:`slimrank.compression.gradient_pruning`). Sparsity ramps up over the first
    ``prune.ramp_epochs`` epochs; fine-tuning goes on at the final sparsity, and the epoch is
    chosen on validation NDCG among those (see :func:`~slimrank.compression.fit.fit_epochs`).
    Fine-tuning a fixed number of epochs overfit: the students peak within a few epochs on
    ml-100k's 1,886 training lists.
    """
    from slimrank.compression.fit import fit_on_valid
    from slimrank.compression.gradient_pruning import TaylorPruner, ThresholdPruner
    from slimrank.compression.pruning import (
        MagnitudePruner,
        PruningSchedule,
        fold_masks,
        sparsity_report,
    )
    from slimrank.compression.structured import prune_units

    torch.manual_seed(config.seed)
    views = candidates.views
    _, feats, labels = views["train"]
    mean, std = student.standardization()
    lists = list_data(feats, labels, teacher.scores["train"], mean, std)
    model = student.model()
    shrunk = prune_units(model, prune.structured_fraction) if prune.structured_fraction else model
    ramp_steps = prune.ramp_epochs * math.ceil(len(lists) / config.batch_size)
    frequency = max(1, ramp_steps // prune.updates)
    schedule = PruningSchedule(
        initial_sparsity=0.0,
        final_sparsity=prune.final_sparsity,
        begin_step=0,
        end_step=frequency * prune.updates,
        frequency=frequency,
    )
    pruner: Any = None
    if prune.final_sparsity > 0 and method == "magnitude":
        pruner = MagnitudePruner(schedule)
    elif prune.final_sparsity > 0 and method == "taylor":
        pruner = TaylorPruner(schedule)
    elif prune.final_sparsity > 0 and method == "l1":
        pruner = ThresholdPruner(prune.final_sparsity, schedule.end_step)
    elif method not in PRUNE_METHODS:
        raise ValueError(f"pruning method {method!r}: one of {PRUNE_METHODS}")
    tune = config.fit(epochs=prune.epochs, lr=prune.lr, patience=prune.patience)
    if method == "l1":
        tune = dataclasses.replace(tune, l1=l1_penalty)
    metric = _valid_ndcg(views, data, mean, std, k)
    model, history = fit_on_valid(shrunk, lists, config.distill, tune, metric, pruner)
    model = fold_masks(model, pruner) if pruner is not None else model
    extra = {
        "method": method,
        "sparsity": sparsity_report(model),
        "schedule": schedule.to_dict(),
        "epochs": history,
    }
    path = _save_student(out, model, mean, std, extra, config.fold_standardization)
    artifacts.save_metrics(out, evaluate_views(views, data, onnx_score_fn(path), k))
    return StudentArtifact(out)


# -- int8 and the gate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GateInputs:
    """What a gated step reads: validation lists and metric, the teacher's value, calibration
    rows and the benchmark list."""

    data: DataArtifact
    views: dict
    teacher_valid: float
    calibration: np.ndarray  # (M, F) real training candidates
    bench_x: np.ndarray  # (N, F) one validation user's candidates, pads included as zeros
    lists: Any  # ReferenceLists of the validation view
    valid_metric: Any  # scorer -> validation NDCG@k


def _gate_inputs(
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    calibration_candidates: int,
) -> _GateInputs:
    from slimrank.compression.gate import ReferenceLists

    views = candidates.views
    teacher_metrics = teacher.metrics
    metric = f"ndcg@{k}"
    v_cands, v_feats, _ = views["valid"]
    truth = data.truth("valid")
    _, t_feats, _ = views["train"]
    rows = t_feats.values[t_feats.mask]  # (M, F) real training candidates
    rng = np.random.default_rng(0)
    calibration = rows[
        np.sort(rng.choice(len(rows), min(len(rows), calibration_candidates), False))
    ]

    def valid_metric(scorer: Any) -> float:
        return pipeline_metrics(v_cands, score_lists(scorer, v_feats.values), truth, (k,))[metric]

    return _GateInputs(
        data,
        views,
        float(teacher_metrics["valid"][metric]),
        calibration,
        v_feats.values[0],
        ReferenceLists(v_feats.values, v_feats.mask, k),
        valid_metric,
    )


def _mode_latency(
    out: Path, modes: list[str], bench_x: np.ndarray, repeats: int
) -> dict[str, float]:
    """Return the median seconds of each mode's gated ranker on ``bench_x``, interleaved."""
    from slimrank.compression.latency import interleaved_latency
    from slimrank.compression.scorer import onnx_scorer

    if not modes:
        return {}
    x = np.ascontiguousarray(bench_x, dtype=np.float32)
    scorers = {m: onnx_scorer(Int8Artifact.mode_dir(out, m) / artifacts.INT8_RANKER) for m in modes}
    fns = {m: (lambda s=s: s.score(x)) for m, s in scorers.items()}
    return {m: t["p50"] for m, t in interleaved_latency(fns, repeats, warmup=5).items()}


def choose_mode(
    passed: list[str],
    fallbacks: dict[str, int],
    latency: dict[str, float],
    choose_by: str,
    margin: float,
) -> tuple[str | None, str]:
    """Return the int8 mode to serve among those that ``passed`` the gate, and why.

    The preferred mode needs the fewest fp32 fallbacks (ties: the order of ``passed``, the
    config's). With ``choose_by="latency"`` a faster mode replaces it only when its measured
    median is at least ``margin`` (a fraction) below the preferred mode's: modes a few µs
    apart are within timing noise on a busy machine, and choosing by noise made the published
    ranker change run to run.
    """
    if not passed:
        return None, "no mode passed the gate"
    preferred = min(passed, key=lambda m: (fallbacks[m], passed.index(m)))
    if choose_by != "latency" or len(passed) == 1:
        return preferred, f"{preferred}: fewest fp32 fallbacks, then config order"
    fastest = min(passed, key=lambda m: (latency[m], passed.index(m)))
    if fastest != preferred and latency[fastest] <= (1.0 - margin) * latency[preferred]:
        saved = 1.0 - latency[fastest] / latency[preferred]
        return fastest, f"{fastest}: {saved:.0%} faster than {preferred} on this CPU"
    return preferred, (
        f"{preferred}: fewest fp32 fallbacks; no passing mode was {margin:.0%} faster on this CPU"
    )


def int8_step(
    config: Int8Config,
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    pruned: StudentArtifact,
    out: Path,
) -> Int8Artifact:
    """Quantize the pruned student in each mode through the gate; serve one that passes.

    Among the passing modes, :func:`choose_mode` picks by fp32 fallbacks and measured
    latency on this CPU; ``gate.json`` names the CPU's model and SIMD flags.

    The gate compares validation NDCG@k with the teacher's, and the int8 top-k of each
    validation user with the fp32 pruned student's. When no mode passes, nothing is kept as
    ``ranker.int8.onnx``; an ungated full-int8 copy (``rejected.int8.onnx``) is kept for the
    report only.
    """
    from slimrank.compression.gate import gate_int8, quantize

    g = _gate_inputs(k, data, candidates, teacher, config.calibration_candidates)
    views, teacher_valid, calibration = g.views, g.teacher_valid, g.calibration
    valid_metric, lists, bench_x = g.valid_metric, g.lists, g.bench_x
    src = pruned.ranker
    decisions: dict[str, Any] = {}
    for mode in config.modes:
        gate = dataclasses.replace(config.gate, mode=mode)
        decision = gate_int8(
            src,
            Int8Artifact.mode_dir(out, mode),
            valid_metric,
            teacher_valid,
            calibration,
            gate,
            lists=lists,
        )
        record = decision.to_dict()
        accepted = Int8Artifact.mode_dir(out, mode) / artifacts.INT8_RANKER
        record["model_path"] = str(accepted.relative_to(out)) if decision.accepted else None
        decisions[mode] = record
    passed = [m for m in config.modes if decisions[m]["accepted"]]
    latency = _mode_latency(out, passed, bench_x, config.bench_repeats)
    chosen, why = choose_mode(
        passed,
        {m: len(decisions[m]["excluded_nodes"]) for m in passed},
        latency,
        config.choose_by,
        config.latency_margin,
    )
    if chosen is not None:
        final = out / artifacts.INT8_RANKER
        shutil.copyfile(Int8Artifact.mode_dir(out, chosen) / artifacts.INT8_RANKER, final)
    else:
        final = out / artifacts.REJECTED_INT8
        quantize(config.modes[0], src, final, calibration, config.gate.quant)
    metrics = evaluate_views(views, data, onnx_score_fn(final), k)
    summary = {
        "accepted": chosen is not None,
        "mode": chosen,
        "min_ratio": config.gate.min_ratio,
        "teacher_valid": teacher_valid,
        "median_seconds": latency,
        "choice": why,
        "cpu": cpu_features(),
        "decisions": decisions,
        "model": final.name,
    }
    Int8Artifact.save_gate(out, summary)
    artifacts.save_metrics(out, metrics)
    return Int8Artifact(out)


# -- per-layer precision -----------------------------------------------------------------------


def precision_step(
    config: Int8Config,
    choices: tuple[str, ...],
    k: int,
    data: DataArtifact,
    candidates: CandidatesArtifact,
    teacher: TeacherArtifact,
    pruned: StudentArtifact,
    out: Path,
) -> PrecisionArtifact:
    """fp16 weights, and the per-layer precision search, on the pruned student.

    Writes ``fp16/model.onnx`` (every layer's weights in fp16) with its metrics, and the
    search (:func:`~slimrank.compression.precision.search_precision`, the int8 gate's checks
    and bars): the fastest passing plan as ``ranker.onnx`` with ``metrics.json``, and every
    plan in ``precision.json`` with the CPU it was timed on. If no plan passes, ``ranker.onnx``
    is the all-fp32 plan and ``precision.json`` says it was not accepted.
    """
    from slimrank.compression.precision import apply_plan, search_precision
    from slimrank.compression.quantize import quantizable_nodes
    from slimrank.compression.scorer import onnx_scorer

    g = _gate_inputs(k, data, candidates, teacher, config.calibration_candidates)
    src = pruned.ranker
    nodes = quantizable_nodes(src)
    fp16 = PrecisionArtifact(out).fp16
    half = apply_plan(src, artifacts.ranker_path(fp16), dict.fromkeys(nodes, "fp16"))
    artifacts.save_metrics(fp16, evaluate_views(g.views, data, onnx_score_fn(half), k))
    reference = g.lists.scores(onnx_scorer(src))
    search = search_precision(
        src,
        out,
        choices,
        g.valid_metric,
        g.teacher_valid,
        reference,
        g.lists,
        config.gate.min_ratio,
        config.gate.min_same_top_k,
        g.bench_x,
        config.bench_repeats,
        config.gate.quant,
    )
    final = PrecisionArtifact(out).ranker
    if search.chosen is None:
        shutil.copyfile(src, final)
    chosen = search.results[search.chosen].plan if search.chosen is not None else None
    summary = {
        "accepted": search.chosen is not None,
        "plan": chosen,
        "teacher_valid": g.teacher_valid,
        "min_ratio": config.gate.min_ratio,
        "min_same_top_k": config.gate.min_same_top_k,
        "cpu": cpu_features(),
        **search.to_dict(),
    }
    PrecisionArtifact.save_summary(out, summary)
    artifacts.save_metrics(out, evaluate_views(g.views, data, onnx_score_fn(final), k))
    return PrecisionArtifact(out)
