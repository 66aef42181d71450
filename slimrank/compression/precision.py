"""Per-layer precision: fp16 weights, and a search over int8 / fp16 / fp32 per layer under the
accuracy gate that keeps the fastest ranker that passes.

What onnxruntime's CPU provider runs, measured (1.32, AVX-512 with VNNI, no AVX-512-FP16):

- ``fp16``: the layer's weight is stored in fp16 and cast to fp32 in front of its matmul, so
  the file shrinks and the arithmetic stays fp32. A MatMul with fp16 inputs also runs on the
  CPU provider, at the speed of fp32 on this CPU (122 vs 125 us for a 200 x 259 x 128 matmul,
  one thread): there is no fp16 arithmetic to gain here, so the stored-fp16 form is used.
- ``int8``: onnxruntime dynamic int8 (int8 weights, uint8 activations quantized per call,
  an integer matmul): the only int8 form with an integer kernel, so the only one that can be
  faster than fp32. "fp16 weights with int8 activations" in one layer has no kernel on the CPU
  provider; a plan can mix them across layers instead (int8 in some, fp16 in others).
- ``fp32``: unchanged.

:func:`search_precision` tries every assignment of the allowed precisions to the Gemm/MatMul
layers (``len(choices) ** layers`` plans; a student has 3-4 layers), applies the gate's two
checks to each (NDCG ratio against the teacher, same top-k as the fp32 ranker), measures the
passing plans' latency side by side (:func:`~slimrank.compression.latency.interleaved_latency`)
and keeps the fastest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimrank.bundle.checksums import sha256_file
from slimrank.compression.agreement import same_top_k
from slimrank.compression.latency import interleaved_latency
from slimrank.compression.quantize import QuantConfig, quantizable_nodes, quantize_onnx_dynamic
from slimrank.compression.scorer import Scorer, ScorerConfig
from slimrank.config import require

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "fp32")
MAX_PLANS = 729  # 3 ** 6: more layers than a student has


def fp16_weights(src: str | Path, dst: str | Path, nodes: Sequence[str]) -> Path:
    """Write a copy of ``src`` whose Gemm/MatMul ``nodes`` keep their weight in fp16 (cast to
    fp32 in front of the node); every other node is unchanged. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    known = set(quantizable_nodes(src))
    unknown = sorted(set(nodes) - known)
    require(not unknown, "fp16_weights", "nodes", unknown, f"not Gemm/MatMul in {src.name}")
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    out: list[onnx.NodeProto] = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        init = inits.get(node.input[1]) if len(node.input) > 1 else None
        if node.name in nodes and init is not None and init.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(init).astype(np.float16)
            graph.initializer.append(numpy_helper.from_array(half, f"{init.name}_fp16"))
            cast = f"{init.name}_from_fp16"
            out.append(
                helper.make_node(
                    "Cast", [f"{init.name}_fp16"], [cast], name=f"{cast}_Cast", to=TensorProto.FLOAT
                )
            )
            node.input[1] = cast
        out.append(node)
    used = {i for n in out for i in n.input}
    for name, init in inits.items():
        if name not in used:
            graph.initializer.remove(init)
    del graph.node[:]
    graph.node.extend(out)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def apply_plan(
    src: str | Path, dst: str | Path, plan: Mapping[str, str], quant: QuantConfig | None = None
) -> Path:
    """Write ``src`` with each Gemm/MatMul layer in the precision ``plan`` gives it (layers the
    plan leaves out stay fp32). Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    bad = {n: p for n, p in plan.items() if p not in PRECISIONS}
    require(not bad, "apply_plan", "plan", bad, f"precisions must be in {PRECISIONS}")
    half = [n for n, p in plan.items() if p == "fp16"]
    int8 = [n for n, p in plan.items() if p == "int8"]
    nodes = quantizable_nodes(src)
    if not int8:
        return fp16_weights(src, dst, half)
    staged = dst.with_name(f"{dst.stem}.fp16-stage.onnx")
    fp16_weights(src, staged, half)
    try:
        quantize_onnx_dynamic(staged, dst, quant, [n for n in nodes if n not in int8])
    finally:
        staged.unlink(missing_ok=True)
    return dst


def all_plans(nodes: Sequence[str], choices: Sequence[str]) -> list[dict[str, str]]:
    """Return every assignment of ``choices`` to ``nodes`` (the last node varies fastest)."""
    require(len(choices) > 0, "all_plans", "choices", list(choices), "needs one or more")
    count = len(choices) ** len(nodes)
    require(count <= MAX_PLANS, "all_plans", "nodes", len(nodes), f"{count} plans > {MAX_PLANS}")
    return [
        dict(zip(nodes, combo, strict=True))
        for combo in itertools.product(choices, repeat=len(nodes))
    ]


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """One plan through the gate: its checks, and its latency if it passed."""

    plan: dict[str, str]
    metric: float
    ratio: float
    same_top_k: float | None
    passed: bool
    bytes: int
    p50_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class PrecisionSearch:
    """Every plan's result, and the index of the fastest passing one (``None``: none passed)."""

    results: tuple[PlanResult, ...]
    chosen: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "results": [dataclasses.asdict(r) for r in self.results]}


def search_precision(
    src: str | Path,
    out_dir: str | Path,
    choices: Sequence[str],
    metric: Callable[[Scorer], float],
    teacher_metric: float,
    reference_scores: np.ndarray,
    lists: Any,
    min_ratio: float,
    min_same_top_k: float,
    bench: np.ndarray,
    repeats: int,
    quant: QuantConfig | None = None,
    warmup: int = 5,
) -> PrecisionSearch:
    """Try every plan of ``choices`` per layer of ``src``; keep the fastest that passes.

    ``lists`` are the gate's :class:`~slimrank.compression.gate.ReferenceLists` and
    ``reference_scores`` the fp32 ranker's ``(U, N)`` scores of them. Passing plans are timed
    scoring ``bench`` ``(M, F)`` on one thread, interleaved; the chosen one is written to
    ``out_dir/ranker.onnx`` and the others are deleted.
    """
    require(teacher_metric > 0, "search_precision", "teacher_metric", teacher_metric, "> 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = all_plans(quantizable_nodes(src), choices)
    results: list[PlanResult] = []
    passing: dict[int, Scorer] = {}
    one = ScorerConfig(intra_op_threads=1)
    for i, plan in enumerate(plans):
        path = apply_plan(src, out_dir / f"plan{i}.onnx", plan, quant)
        scorer = Scorer(path, sha256_file(path), one)
        value = float(metric(scorer))
        ratio = value / teacher_metric
        same = same_top_k(reference_scores, lists.scores(scorer), lists.k, lists.mask)
        passed = ratio >= min_ratio and same >= min_same_top_k
        results.append(PlanResult(plan, value, ratio, same, passed, path.stat().st_size))
        log.info(
            "precision plan %d %s: ratio %.4f, same top-k %.3f -> %s",
            i,
            plan,
            ratio,
            same,
            "pass" if passed else "fail",
        )
        if passed:
            passing[i] = scorer
    chosen = None
    if passing:
        x = np.ascontiguousarray(bench, dtype=np.float32)
        timed = interleaved_latency(
            {str(i): (lambda s=s: s.score(x)) for i, s in passing.items()}, repeats, warmup
        )
        for i in passing:
            results[i] = dataclasses.replace(results[i], p50_seconds=timed[str(i)]["p50"])
        chosen = min(passing, key=lambda i: (timed[str(i)]["p50"], i))
        shutil.copyfile(out_dir / f"plan{chosen}.onnx", out_dir / "ranker.onnx")
    for i in range(len(plans)):
        (out_dir / f"plan{i}.onnx").unlink(missing_ok=True)
    return PrecisionSearch(tuple(results), chosen)
