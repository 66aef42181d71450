"""int8 post-training quantization: torch dynamic, ONNX Runtime dynamic and static, weight-only.

Three rewrites of the fp32 ONNX graph of :func:`~slimrank.compression.export.export_onnx`:

- dynamic (ONNX Runtime): int8 weights; activations quantized to uint8 per call, with one
  range for the whole ``(M, F)`` batch, so a candidate's score depends on the other
  candidates scored with it;
- static (ONNX Runtime, QDQ): int8 weights; activation ranges fixed from calibration
  candidates;
- weights (:func:`quantize_onnx_weights`): int8 weights, fp32 activations. Each weight is
  stored as int8 with a per-output-channel scale and a DequantizeLinear in front of its
  Gemm/MatMul (QDQ on the weight only).

Measured on ml-100k's pipeline student (259 features, 32-16-1 after pruning; 943 users x 200
candidates, test view): 8-bit activations are what moves the top-10. Fake-quantizing only the
activations of one layer changed the top-10 set of 6-12% of users, while all weights in int8
changed 1.1% (1.5% at 7 bits). Static int8 kept the same top-10 set for 86% of users, dynamic
for 89% scored one user per call (29% with every user in one call), weight-only for 98.9%.
The 10th and 11th candidates' fp32 scores are close on real lists (median gap 2.2% of the
score std, 10th percentile 0.3%), so a per-tensor 8-bit step in the activations (0.3-0.9%
of the std in the scores, per layer) swaps them.

Only Gemm/MatMul nodes are quantized; every node left in fp32 is logged with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

from slimrank.compression.export import INPUT_NAME
from slimrank.config import Config, require

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Gemm", "MatMul")
# onnxruntime's dynamic quantizer rewrites Gemm "x" as MatMul "x_MatMul" + Add before it
# looks at nodes_to_exclude, so excluding "x" alone would silently quantize it anyway.
_DYNAMIC_MATMUL_SUFFIX = "_MatMul"
_QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_CALIBRATE = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


@dataclasses.dataclass(frozen=True)
class QuantConfig(Config):
    """Settings of the ONNX Runtime quantizers.

    Defaults are uint8 activations with int8 per-channel weights (U8S8). ``reduce_range``
    (7-bit weights) is on by default: on x86 CPUs without VNNI (AVX2 only, like the build
    machine) full-range U8S8 saturates int16 pair sums inside the kernel, and measured on a
    small MLP it made scores ~20x less accurate (mean |error| 0.020 vs 0.001 for scores of mean
    magnitude 0.12). On a VNNI CPU that costs one bit for nothing: set it False there.
    ``quantize_outputs=False`` keeps each Gemm's output in fp32 (only its
    inputs and weights are int8), so scores are not rounded onto a 256-level grid, which would
    create ties in the top-k.

    :func:`quantize_onnx_weights` uses ``per_channel`` only: its weights are dequantized
    before an fp32 matmul, so no integer kernel can saturate and it always uses the full
    symmetric int8 range [-127, 127] (``weight_type`` int8).
    """

    per_channel: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"
    reduce_range: bool = True
    quantize_outputs: bool = False
    calibrate_method: str = "minmax"
    calibration_batch: int = 256

    def __post_init__(self) -> None:
        for name in ("weight_type", "activation_type"):
            v = getattr(self, name)
            require(v in _QUANT_TYPES, self, name, v, f"must be one of {sorted(_QUANT_TYPES)}")
        require(
            self.calibrate_method in _CALIBRATE,
            self,
            "calibrate_method",
            self.calibrate_method,
            f"must be one of {sorted(_CALIBRATE)}",
        )
        require(
            self.calibration_batch > 0,
            self,
            "calibration_batch",
            self.calibration_batch,
            "must be positive",
        )


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with its Linear layers as torch dynamic int8 (per tensor).

    For comparison only: the result is a torch module, which cannot be stored without pickle.
    """
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao; it still works in 2.13.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8, inplace=False
        )


def quantizable_nodes(path: str | Path) -> list[str]:
    """Return the names of the Gemm/MatMul nodes of an ONNX graph, in graph order."""
    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]


def fp32_nodes(path: str | Path, names: Sequence[str]) -> list[str]:
    """Return those of ``names`` that are still fp32 Gemm/MatMul nodes in a quantized graph.

    A node counts as quantized if it was replaced (dynamic) or reads a DequantizeLinear output
    as its weight (QDQ).
    """
    graph = onnx.load(str(path)).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    by_name = {n.name: n for n in graph.node}
    left = []
    for name in names:
        # The dynamic quantizer first splits Gemm "x" into MatMul "x_MatMul" and an Add.
        node = by_name.get(name) or by_name.get(f"{name}{_DYNAMIC_MATMUL_SUFFIX}")
        if node is None or node.op_type not in QUANTIZED_OPS:
            continue
        if produced_by.get(node.input[1]) != "DequantizeLinear":
            left.append(name)
    return left


def _log_fp32(
    src: Path, dst: Path, exclude: Sequence[str], why: str = "not quantized by onnxruntime"
) -> None:
    for name in fp32_nodes(dst, quantizable_nodes(src)):
        reason = "excluded by the caller" if name in exclude else why
        log.info("%s: node %s left in fp32 (%s)", dst.name, name, reason)


def _check_exclude(src: Path, exclude: Sequence[str]) -> list[str]:
    nodes = quantizable_nodes(src)
    unknown = sorted(set(exclude) - set(nodes))
    require(not unknown, "quantize", "nodes_to_exclude", unknown, f"not Gemm/MatMul in {src.name}")
    return list(exclude)


def quantize_onnx_dynamic(
    src: str | Path,
    dst: str | Path,
    config: QuantConfig | None = None,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Write an ORT dynamic-int8 copy of the fp32 ONNX model ``src`` to ``dst``; return ``dst``.

    Dynamic quantization in ORT takes only the weight type (activations are uint8).
    """
    config = config or QuantConfig()
    src, dst = Path(src), Path(dst)
    exclude = _check_exclude(src, nodes_to_exclude)
    quantize_dynamic(
        src,
        dst,
        weight_type=_QUANT_TYPES[config.weight_type],
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=[*exclude, *(f"{n}{_DYNAMIC_MATMUL_SUFFIX}" for n in exclude)],
    )
    _log_fp32(src, dst, exclude)
    return dst


class CandidateReader(CalibrationDataReader):
    """Feeds ``(M, F)`` calibration candidates to ORT's calibrator in equal batches.

    A last, shorter batch is dropped (and logged): ORT's histogram calibrators (percentile,
    entropy) stack batches and fail on unequal shapes.
    """

    def __init__(self, features: np.ndarray, batch: int) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)  # (M, F)
        batch = min(batch, len(features))
        keep = len(features) - len(features) % batch
        if keep < len(features):
            log.info(
                "calibration: dropping the last %d of %d rows", len(features) - keep, len(features)
            )
        self.features = features[:keep]
        self.batch = batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.features), self.batch):
            yield {INPUT_NAME: self.features[start : start + self.batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_onnx_static(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray,
    config: QuantConfig | None = None,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Write an ORT static-int8 (QDQ) copy of ``src`` calibrated on ``(M, F)`` candidates."""
    config = config or QuantConfig()
    src, dst = Path(src), Path(dst)
    calibration = np.asarray(calibration, dtype=np.float32)
    require(
        calibration.ndim == 2 and len(calibration) > 0,
        "quantize_onnx_static",
        "calibration",
        calibration.shape,
        "must be a non-empty (M, F) array",
    )
    exclude = _check_exclude(src, nodes_to_exclude)
    extra = (
        {}
        if config.quantize_outputs
        else {"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)}
    )
    quantize_static(
        src,
        dst,
        CandidateReader(calibration, config.calibration_batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=_QUANT_TYPES[config.activation_type],
        weight_type=_QUANT_TYPES[config.weight_type],
        nodes_to_exclude=exclude,
        calibrate_method=_CALIBRATE[config.calibrate_method],
        extra_options=extra,
    )
    _log_fp32(src, dst, exclude)
    return dst


def _weight_axis(node: onnx.NodeProto) -> int:
    """Return the output-channel axis of a Gemm/MatMul's weight (its second input)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # (N, K) when transposed, else (K, N)
    return 1  # MatMul: (K, N)


def int8_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(q, scale)``: symmetric int8 ``q`` with ``weight ~= q * scale``.

    ``axis`` is the output-channel axis of a 2-D ``weight`` (one scale per channel), or
    ``None`` for one scale over the whole tensor. An all-zero channel (a pruned unit) gets
    scale 1 and stays exactly zero; zeros of unstructured pruning stay exactly zero too.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        amax = np.abs(weight).max(keepdims=True)  # (1, 1)
    else:
        amax = np.abs(weight).max(axis=1 - axis, keepdims=True)  # (N, 1) or (1, N)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1) if axis is not None else scale.reshape(())


def quantize_onnx_weights(
    src: str | Path,
    dst: str | Path,
    config: QuantConfig | None = None,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Write a weight-only int8 copy of ``src`` to ``dst`` (activations stay fp32); return it.

    Every Gemm/MatMul whose weight is a float32 2-D initializer gets that weight as int8 plus a
    scale (per output channel unless ``config.per_channel`` is False) and a DequantizeLinear
    in front; biases and every other node stay as they are. No calibration is needed.
    """
    config = config or QuantConfig()
    src, dst = Path(src), Path(dst)
    exclude = _check_exclude(src, nodes_to_exclude)
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dequantized: dict[str, str] = {}  # weight initializer -> its DequantizeLinear output
    nodes: list[onnx.NodeProto] = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the graph's own nodes are cleared below
        init = inits.get(node.input[1]) if len(node.input) > 1 else None
        eligible = (
            node.op_type in QUANTIZED_OPS
            and node.name not in exclude
            and init is not None
            and init.data_type == onnx.TensorProto.FLOAT
            and len(init.dims) == 2
        )
        if eligible and init.name not in dequantized:
            name = init.name
            axis = _weight_axis(node) if config.per_channel else None
            q, scale = int8_weight(numpy_helper.to_array(init), axis)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_quantized"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{name}_zero_point"),
                ]
            )
            attrs = {"axis": axis} if axis is not None else {}
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                    [f"{name}_dequantized"],
                    name=f"{name}_DequantizeLinear",
                    **attrs,
                )
            )
            dequantized[name] = f"{name}_dequantized"
        if eligible:
            node.input[1] = dequantized[init.name]
        nodes.append(node)
    used = {i for n in nodes for i in n.input}
    for name in dequantized:
        if name not in used:  # an excluded node may still read the fp32 original
            graph.initializer.remove(inits[name])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    _log_fp32(src, dst, exclude, "its weight is not a float32 2-D initializer")
    return dst
