"""Write rankers in formats that load without unpickling: ONNX graphs and safetensors weights."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimrank.config import require
from slimrank.ranking.mlp import MLPConfig, MLPRanker

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "scores"
# The dynamo exporter implements opset 18 and up; asking for less triggers a lossy conversion.
OPSET = 18


class _Flat(nn.Module):
    """Present any ranker as ``(M, F) -> (M,)`` for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features).reshape(-1)  # (M,)


def export_onnx(model: nn.Module, path: str | Path, input_dim: int) -> Path:
    """Write ``model`` as an ONNX graph ``features (M, F) float32 -> scores (M,)``; return path.

    Uses the ``torch.export``-based exporter (``dynamo=True``; the TorchScript one is deprecated
    in torch 2.9+) with a dynamic candidate axis, in eval mode, on a copy-free wrapper.
    """
    require(input_dim > 0, "export_onnx", "input_dim", input_dim, "must be positive")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    wrapper = _Flat(model).eval()
    sample = torch.zeros(4, input_dim, dtype=torch.float32)  # (M, F); M > 1 so M stays symbolic
    try:
        with warnings.catch_warnings():
            # Deprecation notices from torch.export internals; nothing the caller can act on.
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                wrapper,
                (sample,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=({0: torch.export.Dim("candidates")},),
                verbose=False,
            )
    finally:
        model.train(was_training)
    program.save(str(path))
    graph = onnx.load(str(path))
    strip_build_metadata(graph)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    log.info("exported %s to %s (opset %d)", type(model).__name__, path, OPSET)
    return path


def strip_build_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's debugging notes from ``model`` in place; return it.

    torch's exporter annotates every node, value and the graph with ``metadata_props``: stack
    traces holding the build checkout's absolute paths, FX node text and class names. None of it
    affects what the graph computes, but it made a ranker's bytes (and so its bundle's sha256)
    depend on where the repository was cloned, and shipped build-machine paths inside bundles.
    The model-level ``metadata_props`` are kept: they are ours, not the exporter's.
    """
    graph = model.graph
    del graph.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del value.metadata_props[:]
    return model


def save_mlp(model: MLPRanker, path: str | Path) -> Path:
    """Write an :class:`MLPRanker`'s weights as safetensors, its config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"mlp_config": json.dumps(model.config.to_dict())})
    return path


def load_mlp(path: str | Path) -> MLPRanker:
    """Return the :class:`MLPRanker` written by :func:`save_mlp` (in eval mode)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    require("mlp_config" in metadata, "load_mlp", "path", str(path), "has no mlp_config metadata")
    model = MLPRanker(MLPConfig.from_dict(json.loads(metadata["mlp_config"])))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


class Standardized(nn.Module):
    """``model((x - mean) / std)`` with the scaling as its own (fp32) step in the graph.

    Folding the scaling into the first Linear layer would be free in fp32, but then the int8
    quantizer sees raw features (counts, scores and embeddings of very different ranges) as
    one per-tensor activation range; standardized inputs quantize far better.
    """

    def __init__(self, model: nn.Module, mean: Any, std: Any) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))  # (F,)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))  # (F,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model((features - self.mean) / self.std)
