"""Cost of a ranker per candidate: parameters, non-zero parameters, sparsity and FLOPs.

FLOPs count the matmuls only, a multiply-add as 2 FLOPs, dense (pruned zeros still count).
:func:`count_cost` measures a torch module; :func:`onnx_linear_cost` reads the same numbers
from an exported (fp32 or int8) ONNX ranker's Gemm/MatMul weights, so every variant of the
compression table is measured on the file that is served.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimrank.config import require

# Ops whose second input is a (K, N) or, for Gemm with transB, (N, K) weight applied per row.
_MATMUL_OPS = ("Gemm", "MatMul", "MatMulInteger")


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Parameters and dense FLOPs per scored candidate (a multiply-add counts as 2 FLOPs)."""

    params: int
    nonzero_params: int
    flops_per_candidate: int

    def to_dict(self) -> dict[str, int]:
        """Return the fields as a plain dict."""
        return dataclasses.asdict(self)


def count_cost(model: nn.Module, input_dim: int, candidates: int = 8) -> ModelCost:
    """Return the cost of scoring one candidate with ``model``.

    FLOPs come from ``torch.utils.flop_counter`` on a ``(candidates, input_dim)`` batch, divided
    by ``candidates``; so any model built from matmul-like ops (Linear, embedding bags excluded)
    is counted, not only :class:`~slimrank.ranking.mlp.MLPRanker`. Only matmuls count: bias adds
    and activations are a few FLOPs per unit and are left out, as in the usual convention.
    Zeros from unstructured pruning still count as dense FLOPs (``nonzero_params`` shows them).
    """
    require(input_dim > 0, "count_cost", "input_dim", input_dim, "must be positive")
    require(candidates > 0, "count_cost", "candidates", candidates, "must be positive")
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(candidates, input_dim, dtype=dtype)  # (M, F)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops() // candidates
    return ModelCost(params=params, nonzero_params=nonzero, flops_per_candidate=int(flops))


def flops_ratio(
    student: nn.Module, teacher: nn.Module, input_dim: int, teacher_input_dim: int | None = None
) -> float:
    """Return student FLOPs per candidate over teacher FLOPs per candidate (want <= 0.1)."""
    s = count_cost(student, input_dim).flops_per_candidate
    t = count_cost(teacher, teacher_input_dim or input_dim).flops_per_candidate
    require(t > 0, "flops_ratio", "teacher", type(teacher).__name__, "has no counted FLOPs")
    return s / t


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """The weights of a ranker's Linear (matmul) layers and their dense FLOPs per candidate.

    Biases, embeddings and every other parameter are left out; ``sparsity`` is the share of
    those weights that are exactly zero. ``layers`` counts the matmuls, ``int8_layers`` those
    whose stored weight is 8-bit (an int8 ranker's fp32 fallbacks are the difference).
    """

    weights: int
    zero_weights: int
    flops_per_candidate: int
    layers: int = 0
    int8_layers: int = 0

    @property
    def sparsity(self) -> float:
        """Share of zero weights (0 when there are no weights)."""
        return self.zero_weights / self.weights if self.weights else 0.0


def linear_cost(model: nn.Module, input_dim: int) -> LinearCost:
    """Return the Linear-layer cost of a torch ranker (FLOPs by :func:`count_cost`)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    flops = count_cost(model, input_dim).flops_per_candidate
    return LinearCost(total, zeros, flops, layers=len(weights))


_WEIGHT_PATH_OPS = ("DequantizeLinear", "Cast", "Transpose")


def onnx_linear_cost(path: str | Path) -> LinearCost:
    """Return the Linear-layer cost of an ONNX ranker ``features (M, F) -> scores (M,)``.

    Reads the constant weight of every Gemm/MatMul/MatMulInteger node: an fp32 initializer, or
    the int8 initializer behind a DequantizeLinear (static and weight-only int8) or read
    directly (dynamic int8), or the fp16 initializer behind a Cast (fp16 weights), through any
    Transpose on the way (onnxruntime's dynamic quantizer rewrites Gemm so). Zeros are
    counted in the stored tensor, so an int8 row also counts weights that rounding to int8
    took to zero. A matmul with a ``(K, N)`` weight costs ``2 K N`` FLOPs per candidate; one
    whose stored weight is int8 or uint8 counts among ``int8_layers``.
    """
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    total = zeros = flops = layers = int8_layers = 0
    for node in graph.node:
        if node.op_type not in _MATMUL_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        # Follow a constant weight through what the graph does to it on the way: dequantize
        # (int8), cast (fp16 weights), transpose (the dynamic quantizer's Gemm rewrite).
        source = producer.get(name)
        while name not in inits and source is not None and source.op_type in _WEIGHT_PATH_OPS:
            name = source.input[0]
            source = producer.get(name)
        require(
            name in inits,
            "onnx_linear_cost",
            "path",
            str(path),
            f"node {node.name} has a weight that is not a constant",
        )
        weight = numpy_helper.to_array(inits[name])
        require(weight.ndim == 2, "onnx_linear_cost", node.name, weight.shape, "weight not 2-D")
        total += weight.size
        zeros += int(np.count_nonzero(weight == 0))
        flops += 2 * weight.size
        layers += 1
        int8_layers += int(weight.dtype in (np.int8, np.uint8))
    return LinearCost(total, zeros, flops, layers, int8_layers)
