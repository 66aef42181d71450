"""The two-tower model's config and file names, without torch.

:class:`TwoTowerConfig` is everything :func:`slimrank.retrieval.two_tower.load_model` needs to
rebuild the model; the server reads it (and the weights, with numpy) to run the user tower of a
bundle's model without importing torch (:mod:`slimrank.serving.history_encoder`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from slimrank.config import Config, require

if TYPE_CHECKING:
    from slimrank.data.dataset import FeatureTable

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


@dataclasses.dataclass(frozen=True)
class FeatureSpec(Config):
    """The feature columns a tower reads, with what it needs to encode them.

    ``categorical``: name -> cardinality; ``numeric_mean`` / ``numeric_std``: name -> the
    statistics used to standardize the raw values; ``multi_hot``: name -> width.
    """

    categorical: dict[str, int] = dataclasses.field(default_factory=dict)
    numeric_mean: dict[str, float] = dataclasses.field(default_factory=dict)
    numeric_std: dict[str, float] = dataclasses.field(default_factory=dict)
    multi_hot: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, card in self.categorical.items():
            require(int(card) >= 1, self, "categorical", {name: card}, "cardinality must be >= 1")
        require(
            set(self.numeric_mean) == set(self.numeric_std),
            self,
            "numeric_std",
            sorted(self.numeric_std),
            f"must name the same columns as numeric_mean {sorted(self.numeric_mean)}",
        )
        for name, std in self.numeric_std.items():
            require(math.isfinite(std) and std > 0, self, "numeric_std", {name: std}, "must be > 0")
        for name, width in self.multi_hot.items():
            require(int(width) >= 1, self, "multi_hot", {name: width}, "width must be >= 1")

    @classmethod
    def from_table(cls, table: FeatureTable) -> FeatureSpec:
        """Return the spec of every column of ``table`` (numeric statistics from its rows)."""
        mean = {k: float(np.mean(v)) if len(v) else 0.0 for k, v in table.numeric.items()}
        std = {k: float(np.std(v)) if len(v) else 1.0 for k, v in table.numeric.items()}
        return cls(
            categorical={k: int(table.cardinality[k]) for k in table.categorical},
            numeric_mean=mean,
            # A constant column standardizes to zeros instead of dividing by zero.
            numeric_std={k: s if s > 0 else 1.0 for k, s in std.items()},
            multi_hot={k: int(v.shape[1]) for k, v in table.multi_hot.items()},
        )

    @property
    def empty(self) -> bool:
        return not (self.categorical or self.numeric_mean or self.multi_hot)

    @property
    def dense_width(self) -> int:
        """Return the number of numeric plus multi-hot inputs."""
        return len(self.numeric_mean) + sum(self.multi_hot.values())


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig(Config):
    """Shape of the two towers; everything :func:`load_model` needs to rebuild the model."""

    n_users: int = 1
    n_items: int = 1
    dim: int = 64  # output dimension d of both towers
    id_dim: int = 64  # width of id, feature and history embeddings
    # Hidden layers of each tower's MLP; none (linear towers) was best on ml-100k valid.
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0  # dropout inside the MLPs
    # False: no MLP at all; a tower's output is the sum of its parts (embeddings of the id,
    # features, history), so hidden must be empty and id_dim == dim. A linear layer on top
    # of an embedding table adds nothing it could not learn, and trains slower.
    projection: bool = True
    # Off by default: a user id embedding memorizes the user's training items, which the
    # protocol excludes, and lost 0.02 valid NDCG@10 on ml-100k.
    use_user_id: bool = False
    use_item_id: bool = True
    use_history: bool = True  # mean of the user's history item embeddings
    max_history: int = 0  # most recent items pooled per user; 0 keeps all
    # History sum / n ** history_power: 1 is the mean, 0.5 keeps the norm of the pooled
    # vector about constant in n (as in FISM), so long histories do not fade next to the
    # features.
    history_power: float = 1.0
    normalize: bool = True  # L2-normalize both towers' outputs (cosine similarity)
    temperature: float = 0.1  # logits = dot / temperature in training
    learn_temperature: bool = False
    # A learned logit per item (its popularity); exported as one extra dimension, so the
    # vectors are dim + 1 wide (see slimrank.retrieval.embeddings).
    item_bias: bool = False
    # Standard deviation of the initial embedding rows; 0 keeps torch's N(0, 1). Unnormalized
    # towers need small ones: N(0, 1) rows start with huge logits and train much worse.
    init_std: float = 0.0
    user_features: FeatureSpec = dataclasses.field(default_factory=FeatureSpec)
    item_features: FeatureSpec = dataclasses.field(default_factory=FeatureSpec)

    def __post_init__(self) -> None:
        require(self.n_users >= 1, self, "n_users", self.n_users, "must be >= 1")
        require(self.n_items >= 1, self, "n_items", self.n_items, "must be >= 1")
        require(self.dim >= 1, self, "dim", self.dim, "must be >= 1")
        require(self.id_dim >= 1, self, "id_dim", self.id_dim, "must be >= 1")
        require(
            all(int(h) >= 1 for h in self.hidden), self, "hidden", self.hidden, "sizes must be >= 1"
        )
        require(0.0 <= self.dropout < 1.0, self, "dropout", self.dropout, "must be in [0, 1)")
        require(
            0.0 <= self.history_power <= 1.0,
            self,
            "history_power",
            self.history_power,
            "must be in [0, 1]",
        )
        require(self.max_history >= 0, self, "max_history", self.max_history, "must be >= 0")
        require(self.temperature > 0, self, "temperature", self.temperature, "must be > 0")
        require(self.init_std >= 0, self, "init_std", self.init_std, "must be >= 0")
        require(
            self.projection or (not self.hidden and self.id_dim == self.dim),
            self,
            "projection",
            self.projection,
            f"False needs hidden=() and id_dim == dim, got {self.hidden} and {self.id_dim} != "
            f"{self.dim}"
            if self.id_dim != self.dim
            else f"False needs hidden=(), got {self.hidden}",
        )
        require(
            self.use_user_id or self.use_history or not self.user_features.empty,
            self,
            "use_user_id",
            self.use_user_id,
            "the user tower needs an id, a history or user features",
        )
        require(
            self.use_item_id or not self.item_features.empty,
            self,
            "use_item_id",
            self.use_item_id,
            "the item tower needs an id or item features",
        )
