"""Structured pruning: remove hidden units of an MLP-like model, shrinking its Linear layers.

"MLP-like" means: the model's Linear layers, in registration order, form a chain (each one's
``out_features`` is the next one's ``in_features``) and everything between two of them acts
elementwise (ReLU, GELU, Dropout, ...). Then hidden unit ``j`` of layer ``l`` is row ``j`` of
``W_l`` and ``b_l`` and column ``j`` of ``W_{l+1}``, and removing it removes exactly its
contribution. Models with other parametrised layers (LayerNorm, BatchNorm, embeddings) are
refused rather than silently mangled.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Sequence

import torch
from torch import nn

from slimrank.config import require
from slimrank.ranking.mlp import MLPConfig

log = logging.getLogger(__name__)


def linear_chain(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Return ``(name, layer)`` of the model's Linear layers in order; raise if not a chain."""
    chain: list[tuple[str, nn.Linear]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            chain.append((name, m))
        elif not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"{name} ({type(m).__name__}) has parameters: not an MLP chain")
    require(len(chain) >= 2, "linear_chain", "model", type(model).__name__, "needs >= 2 Linear")
    for (a, la), (b, lb) in itertools.pairwise(chain):
        require(
            la.out_features == lb.in_features,
            "linear_chain",
            "model",
            f"{a}->{b}",
            f"widths {la.out_features} != {lb.in_features}: not a chain",
        )
    return chain


@torch.no_grad()
def unit_scores(model: nn.Module) -> list[torch.Tensor]:
    """Return one ``(H_l,)`` score per hidden unit of each hidden layer.

    Score = L1 norm of the unit's incoming weights and bias times the L1 norm of its outgoing
    weights. The product bounds the unit's effect on the next layer (a ReLU is 1-Lipschitz) and,
    unlike the incoming norm alone, does not change when a ReLU unit is rescaled by ``c`` in and
    ``1/c`` out; a unit whose outgoing weights are zero scores 0 and goes first.
    """
    chain = [layer for _, layer in linear_chain(model)]
    scores = []
    for layer, nxt in itertools.pairwise(chain):
        incoming = layer.weight.abs().sum(dim=1)  # (H,)
        if layer.bias is not None:
            incoming = incoming + layer.bias.abs()
        outgoing = nxt.weight.abs().sum(dim=0)  # (H,)
        scores.append(incoming * outgoing)
    return scores


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def shrink_units(model: nn.Module, keep: Sequence[Sequence[int] | torch.Tensor]) -> nn.Module:
    """Return a copy of ``model`` keeping only hidden units ``keep[l]`` of hidden layer ``l``.

    Each kept Linear layer is a new, smaller ``nn.Linear``; the next layer loses the matching
    input columns. An :class:`MLPConfig` held as ``model.config`` is updated to the new widths.
    """
    shrunk = copy.deepcopy(model)
    chain = linear_chain(shrunk)
    require(
        len(keep) == len(chain) - 1,
        "shrink_units",
        "keep",
        len(keep),
        f"needs one index list per hidden layer ({len(chain) - 1})",
    )
    kept = [torch.as_tensor(k, dtype=torch.long).unique(sorted=True) for k in keep]
    for layer_no, idx in enumerate(kept):
        width = chain[layer_no][1].out_features
        require(
            idx.numel() > 0, "shrink_units", f"keep[{layer_no}]", [], "must keep at least one unit"
        )
        require(
            int(idx.min()) >= 0 and int(idx.max()) < width,
            "shrink_units",
            f"keep[{layer_no}]",
            idx.tolist(),
            f"indices must be in [0, {width})",
        )
    rows: list[torch.Tensor | None] = [*kept, None]  # output units kept per layer
    cols: list[torch.Tensor | None] = [None, *kept]  # input features kept per layer
    for (name, old), out_idx, in_idx in zip(chain, rows, cols, strict=True):
        weight = old.weight  # (out, in)
        bias = old.bias
        if out_idx is not None:
            weight = weight[out_idx]
            bias = None if bias is None else bias[out_idx]
        if in_idx is not None:
            weight = weight[:, in_idx]
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        new = new.to(dtype=old.weight.dtype, device=old.weight.device)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
        _set_module(shrunk, name, new)
    config = getattr(shrunk, "config", None)
    if isinstance(config, MLPConfig):
        shrunk.config = dataclasses.replace(config, hidden=tuple(int(k.numel()) for k in kept))
    return shrunk


def prune_units(model: nn.Module, fraction: float | Sequence[float]) -> nn.Module:
    """Return a copy of ``model`` without the lowest-scoring ``fraction`` of each hidden layer.

    ``fraction`` is one value for all hidden layers or one per layer; at least one unit stays.
    """
    scores = unit_scores(model)
    fractions = [fraction] * len(scores) if isinstance(fraction, float | int) else list(fraction)
    require(
        len(fractions) == len(scores),
        "prune_units",
        "fraction",
        fraction,
        f"needs one value per hidden layer ({len(scores)})",
    )
    keep = []
    for layer_no, (s, f) in enumerate(zip(scores, fractions, strict=True)):
        require(0.0 <= f < 1.0, "prune_units", "fraction", f, "must be in [0, 1)")
        n_keep = max(1, s.numel() - round(f * s.numel()))
        idx = torch.argsort(s, descending=True, stable=True)[:n_keep]
        log.info("hidden layer %d: keeping %d of %d units", layer_no, n_keep, s.numel())
        keep.append(idx)
    return shrink_units(model, keep)
