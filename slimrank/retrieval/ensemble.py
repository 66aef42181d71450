"""A seed ensemble of linear two-towers, stored as one wider two-tower.

Without a projection, a tower's output is the sum of its embedding rows, so ``S`` towers of
width ``d`` concatenated along the width are one tower of width ``S * d`` whose dot product
is the sum of the members' dot products: ``[u_1, ..., u_S] . [v_1, ..., v_S] = sum_j u_j .
v_j``. With a fixed temperature and the item biases added, the wide model's logit is the sum
of the members' logits, exactly. Everything downstream (embeddings, the FAISS index, the
served user tower) sees one ordinary :class:`TwoTower`.

On ml-100k a two-tower's validation NDCG@10 moves by about 0.01 with its seed alone; the sum
of a few seeds is above their mean and moves much less (README, "Quality under equal
information").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from slimrank.retrieval.two_tower import TwoTower
from slimrank.retrieval.two_tower_config import TwoTowerConfig

# The embedding tables a linear tower's output sums, by state-dict name; their rows are
# concatenated along the width.
_TABLES = ("user_tower.id_embedding.weight", "user_tower.history.weight")
_TABLES += ("item_tower.id_embedding.weight",)


def ensemble_problem(config: TwoTowerConfig, members: int) -> str:
    """Return why ``config`` cannot be the sum of ``members`` towers, or ``""`` if it can."""
    if members == 1:
        return ""
    if config.dim % members:
        return f"dim {config.dim} is not divisible by members = {members}"
    if config.projection or config.hidden:
        return "members > 1 needs linear towers: projection = false and hidden = []"
    if config.normalize:
        return "members > 1 needs normalize = false (the sum of unit vectors is not one)"
    if config.learn_temperature:
        return "members > 1 needs a fixed temperature (each member would learn its own)"
    if not (config.user_features.empty and config.item_features.empty):
        return "members > 1 is not built for towers that read features"
    return ""


def member_config(config: TwoTowerConfig, members: int) -> TwoTowerConfig:
    """Return the config of one of the ``members`` towers whose sum ``config`` describes."""
    problem = ensemble_problem(config, members)
    if problem:
        raise ValueError(problem)
    width = config.dim // members
    return dataclasses.replace(config, dim=width, id_dim=width)


@torch.no_grad()
def concat_two_towers(models: Sequence[TwoTower]) -> TwoTower:
    """Return one two-tower whose logits are the sum of ``models``' logits (eval mode)."""
    if not models:
        raise ValueError("no models to concatenate")
    first = models[0].config
    for model in models[1:]:
        if dataclasses.replace(model.config, dim=first.dim, id_dim=first.dim) != first:
            raise ValueError("the members differ in more than their width")
    width = sum(model.config.dim for model in models)
    config = dataclasses.replace(first, dim=width, id_dim=width)
    problem = ensemble_problem(config, len(models))
    if problem:
        raise ValueError(problem)
    merged = TwoTower(config)
    states = [model.state_dict() for model in models]
    state = merged.state_dict()
    for name in state:
        if name in _TABLES:
            state[name] = torch.cat([s[name] for s in states], dim=1)
        elif name == "item_bias.weight":
            state[name] = torch.stack([s[name] for s in states]).sum(0)
        elif name == "log_scale":
            state[name] = states[0][name]  # equal: the temperature is fixed
        else:
            raise ValueError(f"cannot concatenate the parameter {name!r}")
    merged.load_state_dict(state, strict=True)
    return merged.eval()
