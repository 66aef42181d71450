"""The accuracy gate: accept an int8 ranker only if it keeps the teacher's quality and its own
fp32 ranking.

Two checks, both on the caller's validation data:

- quality: ``metric(scorer) -> float``, the pipeline's NDCG@10 (or any higher-is-better
  metric) computed with the int8 scorer, over the teacher's value of the same metric, must be
  at least ``min_ratio``;
- agreement: on the caller's candidate lists ``(U, N, F)``, the int8 ranker's top-k must be
  the fp32 ranker's top-k (as a set) for at least ``min_same_top_k`` of the lists. NDCG
  alone does not see swaps between near-tied candidates at the top-k boundary, so an int8
  ranker can keep the teacher's NDCG while serving other items than its fp32 self.

The gate quantizes, measures, and on failure returns Gemm/MatMul layers to fp32 one at a time
until both checks pass. It stops with one layer still int8: a model with every layer in fp32 is
not an int8 model (it would pass the checks by being the reference), so a mode that only passes
that way is rejected.

Fallback order, ``"first_last"`` by default: the input layer first, then forwards. The input
layer quantizes the raw candidate features, whose 8-bit rounding error reaches every later
layer; measured on a 16-64-32-1 student over standard-normal features (tests/test_quantize.py
data), keeping only the input layer in fp32 cut the mean |int8 - fp32| from 2.2% to 0.9% of the
score std, while keeping only the output layer in fp32 changed nothing (2.1%). The input layer
of a student is also small (``F x h``), so the latency given back is small. ``"last_first"``
starts from the output layer instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.agreement import same_top_k
from slimrank.compression.quantize import (
    QuantConfig,
    quantizable_nodes,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_onnx_weights,
)
from slimrank.compression.scorer import Scorer, ScorerConfig
from slimrank.config import Config, require

log = logging.getLogger(__name__)

# "weights": int8 weights, fp32 activations (see slimrank.compression.quantize).
MODES = ("static", "dynamic", "weights")
# Part of the int8 step's cache key: a gate that decides differently re-runs the step. 2: the
# fallback stops with one layer in int8 (1 could accept a model with every layer in fp32).
GATE_REVISION = 2


@dataclasses.dataclass(frozen=True)
class GateConfig(Config):
    """Pass marks and quantization settings of :func:`gate_int8`.

    ``min_same_top_k`` is the share of validation lists whose int8 top-k set must equal the
    fp32 top-k set (0 turns the check off).
    """

    min_ratio: float = 0.99
    min_same_top_k: float = 0.95
    mode: str = "static"
    fallback_order: str = "first_last"
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        require(0 < self.min_ratio <= 1.5, self, "min_ratio", self.min_ratio, "must be in (0, 1.5]")
        require(
            0 <= self.min_same_top_k <= 1,
            self,
            "min_same_top_k",
            self.min_same_top_k,
            "must be in [0, 1]",
        )
        require(self.mode in MODES, self, "mode", self.mode, f"must be one of {MODES}")
        require(
            self.fallback_order in ("last_first", "first_last"),
            self,
            "fallback_order",
            self.fallback_order,
            "must be 'last_first' or 'first_last'",
        )


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One quantized candidate: which nodes stayed fp32 and how it scored.

    ``same_top_k`` is the share of lists with the fp32 top-k set (``None``: not measured).
    """

    excluded_nodes: tuple[str, ...]
    metric: float
    ratio: float
    same_top_k: float | None
    passed: bool


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The gate's record; ``model_path``/``sha256`` name the accepted file, else ``None``."""

    accepted: bool
    teacher_metric: float
    candidate_metric: float
    ratio: float
    min_ratio: float
    same_top_k: float | None
    min_same_top_k: float
    mode: str
    excluded_nodes: tuple[str, ...]
    attempts: tuple[Attempt, ...]
    model_path: str | None
    sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON-able values."""
        out = dataclasses.asdict(self)
        out["excluded_nodes"] = list(self.excluded_nodes)
        out["attempts"] = [
            {**dataclasses.asdict(a), "excluded_nodes": list(a.excluded_nodes)}
            for a in self.attempts
        ]
        return out


def quality_ratio(candidate_metric: float, teacher_metric: float) -> float:
    """Return ``candidate / teacher``; the teacher's metric must be positive."""
    require(teacher_metric > 0, "quality_ratio", "teacher_metric", teacher_metric, "must be > 0")
    return candidate_metric / teacher_metric


def fallback_sequence(nodes: list[str], order: str) -> list[tuple[str, ...]]:
    """Return the excluded-node sets to try: none, then one more node each time, up to all
    but one (the last node in ``order`` is never excluded, so every try holds some int8)."""
    ordered = list(reversed(nodes)) if order == "last_first" else list(nodes)
    return [tuple(ordered[:k]) for k in range(len(ordered))]


@dataclasses.dataclass(frozen=True)
class ReferenceLists:
    """Candidate lists on which the int8 top-k is compared with the fp32 top-k.

    ``features`` are ``(U, N, F)``; ``mask`` ``(U, N)`` marks real candidates (pads are never
    ranked); ``k`` is the top-k compared.
    """

    features: np.ndarray
    mask: np.ndarray
    k: int = 10

    def __post_init__(self) -> None:
        shape = np.shape(self.features)
        require(len(shape) == 3, self, "features", shape, "must be (U, N, F)")
        require(np.shape(self.mask) == shape[:2], self, "mask", np.shape(self.mask), "(U, N)")
        require(0 < self.k <= shape[1], self, "k", self.k, f"must be in [1, {shape[1]}]")

    def scores(self, scorer: Scorer) -> np.ndarray:
        """Return ``scorer``'s ``(U, N)`` scores of the lists (one call per list, as served)."""
        return np.stack([scorer.score(x) for x in self.features])  # (U, N)


def quantize(
    mode: str,
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray | None,
    config: QuantConfig,
    nodes_to_exclude: tuple[str, ...] = (),
) -> Path:
    """Write the ``mode`` int8 copy of ``src`` to ``dst`` (see :data:`MODES`); return ``dst``."""
    require(mode in MODES, "quantize", "mode", mode, f"must be one of {MODES}")
    if mode == "static":
        require(calibration is not None, "quantize", "calibration", None, "static needs it")
        return quantize_onnx_static(src, dst, calibration, config, nodes_to_exclude)
    if mode == "dynamic":
        return quantize_onnx_dynamic(src, dst, config, nodes_to_exclude)
    return quantize_onnx_weights(src, dst, config, nodes_to_exclude)


def gate_int8(
    fp32_onnx: str | Path,
    out_dir: str | Path,
    metric: Callable[[Scorer], float],
    teacher_metric: float,
    calibration: np.ndarray | None = None,
    config: GateConfig | None = None,
    scorer_config: ScorerConfig | None = None,
    lists: ReferenceLists | None = None,
) -> GateDecision:
    """Quantize ``fp32_onnx`` into ``out_dir`` with fp32 fallback until both checks pass.

    ``calibration`` ``(M, F)`` is required for static mode; ``lists`` whenever
    ``config.min_same_top_k > 0`` (the fp32 ``fp32_onnx`` scores them as the reference).
    Lists are scored one per call, as a server scores one request, so dynamic quantization's
    per-call activation ranges are those it would have in serving. Only the accepted model is
    kept in ``out_dir`` (as ``ranker.int8.onnx``); rejected attempts are deleted.
    """
    config = config or GateConfig()
    fp32_onnx, out_dir = Path(fp32_onnx), Path(out_dir)
    require(
        config.mode != "static" or calibration is not None,
        "gate_int8",
        "calibration",
        None,
        "static quantization needs calibration candidates",
    )
    require(
        config.min_same_top_k == 0 or lists is not None,
        "gate_int8",
        "lists",
        None,
        f"min_same_top_k={config.min_same_top_k} needs reference lists",
    )
    quality_ratio(1.0, teacher_metric)  # validates the teacher's metric before any work
    nodes = quantizable_nodes(fp32_onnx)
    require(bool(nodes), "gate_int8", "fp32_onnx", str(fp32_onnx), "has no Gemm/MatMul to quantize")
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = None
    if lists is not None:
        reference = lists.scores(Scorer(fp32_onnx, sha256_file(fp32_onnx), scorer_config))
    attempts: list[Attempt] = []
    for exclude in fallback_sequence(nodes, config.fallback_order):
        path = out_dir / f"ranker.int8.try{len(attempts)}.onnx"
        quantize(config.mode, fp32_onnx, path, calibration, config.quant, exclude)
        scorer = Scorer(path, sha256_file(path), scorer_config)
        value = float(metric(scorer))
        ratio = quality_ratio(value, teacher_metric)
        same = None
        if lists is not None and reference is not None:
            same = same_top_k(reference, lists.scores(scorer), lists.k, lists.mask)
        passed = ratio >= config.min_ratio and (same is None or same >= config.min_same_top_k)
        attempts.append(Attempt(exclude, value, ratio, same, passed))
        log.info(
            "gate attempt %d (%s): fp32 nodes %s, metric %.5f, ratio %.4f (need %.4f), "
            "same top-k %s (need %.3f) -> %s",
            len(attempts),
            config.mode,
            list(exclude) or "none",
            value,
            ratio,
            config.min_ratio,
            "n/a" if same is None else f"{same:.3f}",
            config.min_same_top_k,
            "pass" if passed else "fail",
        )
        if passed:
            final = path.replace(out_dir / "ranker.int8.onnx")
            return GateDecision(
                accepted=True,
                teacher_metric=teacher_metric,
                candidate_metric=value,
                ratio=ratio,
                min_ratio=config.min_ratio,
                same_top_k=same,
                min_same_top_k=config.min_same_top_k,
                mode=config.mode,
                excluded_nodes=exclude,
                attempts=tuple(attempts),
                model_path=str(final),
                sha256=sha256_file(final),
            )
        path.unlink()
    last = attempts[-1]
    log.warning(
        "gate rejected %s (%s): ratio %.4f, same top-k %s even with one layer left in int8",
        fp32_onnx,
        config.mode,
        last.ratio,
        last.same_top_k,
    )
    return GateDecision(
        accepted=False,
        teacher_metric=teacher_metric,
        candidate_metric=last.metric,
        ratio=last.ratio,
        min_ratio=config.min_ratio,
        same_top_k=last.same_top_k,
        min_same_top_k=config.min_same_top_k,
        mode=config.mode,
        excluded_nodes=last.excluded_nodes,
        attempts=tuple(attempts),
        model_path=None,
        sha256=None,
    )
