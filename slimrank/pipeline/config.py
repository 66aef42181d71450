"""The offline pipeline's configuration: one nested frozen config, read from a TOML file.

Each ``[section]`` of the TOML file is one step's config; a step's cache key is its own
section plus the digests of the steps it reads, so changing ``[student]`` re-runs the students
and what follows them, not the two-tower model.
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from slimrank.compression.distill import DistillConfig
from slimrank.compression.fit import FitConfig
from slimrank.compression.gate import MODES, GateConfig
from slimrank.compression.precision import PRECISIONS
from slimrank.config import Config, ConfigError, FieldError, require
from slimrank.data.split import SplitConfig
from slimrank.ranking.features import FeatureConfig
from slimrank.ranking.train import TrainConfig as TeacherTrainConfig
from slimrank.retrieval.ensemble import ensemble_problem
from slimrank.retrieval.index import IndexConfig
from slimrank.retrieval.train import TrainConfig as TwoTowerTrainConfig
from slimrank.retrieval.two_tower_config import TwoTowerConfig
from slimrank.search.build import TextIndexConfig

SOURCES_SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where interactions come from: a ``load_dataset`` name or path, or ``"synthetic"``.

    The ``synthetic_*`` fields shape the seeded latent-factor catalog used by tests. With a
    logs file as ``source``, ``user_features`` / ``item_features`` name Parquet or CSV tables
    keyed by ``user_id`` / ``item_id``; the item table's ``text_columns`` feed the search
    index instead of the ranker.
    """

    source: str = "movielens-100k"
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    synthetic_users: int = 60
    synthetic_items: int = 80
    synthetic_per_user: int = 20
    synthetic_seed: int = 0
    user_features: str = ""
    item_features: str = ""
    text_columns: tuple[str, ...] = ()

    # Left out of the step digests while unset, so runs cached before they existed stay valid.
    _OPTIONAL = ("user_features", "item_features", "text_columns")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-able values, without the unset feature-table fields."""
        out = super().to_dict()
        for name in self._OPTIONAL:
            if not out[name]:
                del out[name]
        return out

    def __post_init__(self) -> None:
        require(bool(self.source), self, "source", self.source, "must name a dataset")
        require(
            bool(self.item_features) or not self.text_columns,
            self,
            "text_columns",
            list(self.text_columns),
            "need item_features (the table that holds them)",
        )
        for name in ("synthetic_users", "synthetic_items", "synthetic_per_user"):
            value = getattr(self, name)
            require(value >= 1, self, name, value, "must be >= 1")
        require(
            self.synthetic_per_user < self.synthetic_items,
            self,
            "synthetic_per_user",
            self.synthetic_per_user,
            "must be below synthetic_items",
        )


@dataclasses.dataclass(frozen=True)
class TwoTowerStepConfig(Config):
    """The two-tower model's shape (sizes and feature specs come from the data) and training."""

    dim: int = 64
    id_dim: int = 64
    hidden: tuple[int, ...] = (128,)
    dropout: float = 0.0
    use_features: bool = True
    use_history: bool = True
    max_history: int = 0
    temperature: float = 0.1
    # See slimrank.retrieval.two_tower.TwoTowerConfig.
    projection: bool = True
    normalize: bool = True
    item_bias: bool = False
    history_power: float = 1.0
    init_std: float = 0.0
    train: TwoTowerTrainConfig = dataclasses.field(default_factory=TwoTowerTrainConfig)

    def __post_init__(self) -> None:
        require(self.dim >= 1, self, "dim", self.dim, "must be >= 1")
        require(self.id_dim >= 1, self, "id_dim", self.id_dim, "must be >= 1")
        try:  # the model's own checks, named by this section's keys (the same names)
            shape = TwoTowerConfig(
                dim=self.dim,
                id_dim=self.id_dim,
                hidden=self.hidden,
                projection=self.projection,
                normalize=self.normalize,
                temperature=self.temperature,
            )
        except FieldError as err:
            require(False, self, err.field, err.value, err.why)
        members = self.train.members
        problem = ensemble_problem(shape, members)
        if not problem and members > 1 and self.use_features:
            problem = "members > 1 needs use_features = false"
        require(not problem, self, "train.members", members, problem)


@dataclasses.dataclass(frozen=True)
class CandidateConfig(Config):
    """Candidates per user (``n``), the history/target folds of training users, features.

    Each of ``folds`` cuts every user's training items anew (seed ``fold_seed + i``), so the
    rankers train on ``folds`` lists per user.
    """

    n: int = 200
    target_frac: float = 0.2
    fold_seed: int = 0
    folds: int = 1
    # Train a two-tower on each fold's history alone (the same model and training config),
    # so that the retrieval scores of training candidates come from a model that never saw
    # their labels, as at validation and serving (stacking). Off: the full model retrieves
    # for the folds too, which saw the target fold in training.
    refit: bool = False
    # Rankers train on the lists of a seeded sample of this many users per fold, and the
    # valid / test views evaluate a sample of eval_users (0: every user). The feature tables
    # the server reads are built from every user's interactions either way.
    sample_users: int = 0
    eval_users: int = 0
    # The valid view's item-item tables (co-occurrence, EASE): "own" builds them from what
    # valid has seen (train), as the served ones are built; "fold" reuses the first history
    # fold's (a subset of train: no label leaks), one build fewer, but then validation and the
    # gate see the training lists' tables and not the shift to the served ones (at 1M the
    # int8 ranker scored 0.2326 test NDCG@10 on the fold's tables, 0.2008 on the served).
    # The test view (served) always builds its own.
    valid_tables: str = "own"
    # What a training fold's item statistics (popularity, co-occurrence, EASE) read: "all"
    # every user's training items but the target folds of the users whose lists are trained
    # on (the labels), as complete as the served tables up to the labels; "history" the
    # history fold alone (1 - target_frac of train; at 1M the rankers learned features of
    # another scale than the served ones and lost test NDCG@10). The same when every user
    # is sampled (sample_users = 0).
    fold_items: str = "all"
    # Without refit the main two-tower retrieves and featurizes the training lists, so it must
    # not have trained on their labels: "sampled" trains it on train minus the sampled users'
    # target folds (sample_users x target_frac of their items; with sample_users = 0 that is
    # every user's target fold), "none" on all of train (its retrieval score and embedding
    # columns then know the training labels and not valid's or test's).
    hold_out_labels: str = "none"
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        require(self.n >= 1, self, "n", self.n, "must be >= 1")
        require(0 < self.target_frac < 1, self, "target_frac", self.target_frac, "in (0, 1)")
        require(self.folds >= 1, self, "folds", self.folds, "must be >= 1")
        require(self.sample_users >= 0, self, "sample_users", self.sample_users, ">= 0")
        require(self.eval_users >= 0, self, "eval_users", self.eval_users, ">= 0")
        require(
            self.valid_tables in ("own", "fold"),
            self,
            "valid_tables",
            self.valid_tables,
            'must be "own" or "fold"',
        )
        require(
            self.fold_items in ("all", "history"),
            self,
            "fold_items",
            self.fold_items,
            'must be "all" or "history"',
        )
        require(
            self.hold_out_labels in ("none", "sampled"),
            self,
            "hold_out_labels",
            self.hold_out_labels,
            'must be "none" or "sampled"',
        )


@dataclasses.dataclass(frozen=True)
class TeacherStepConfig(Config):
    """The DCN-v2 teacher's shape (input sizes come from the candidates) and training."""

    id_dim: int = 32
    n_cross: int = 3
    deep: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.2
    id_dropout: float = 0.1
    # A candidate feature the score starts from (the head starts at zero and learns a
    # correction to that feature's ranking, e.g. "retrieval_score"); "" starts from nothing.
    base_feature: str = ""
    train: TeacherTrainConfig = dataclasses.field(default_factory=TeacherTrainConfig)

    def __post_init__(self) -> None:
        # Checked here, when the config loads, not when the teacher step builds its model.
        require(len(self.deep) > 0, self, "deep", self.deep, "needs at least one layer")
        require(all(w > 0 for w in self.deep), self, "deep", self.deep, "widths must be > 0")
        require(self.id_dim >= 0, self, "id_dim", self.id_dim, "must be >= 0")
        require(self.n_cross >= 0, self, "n_cross", self.n_cross, "must be >= 0")
        require(0 <= self.dropout < 1, self, "dropout", self.dropout, "must lie in [0, 1)")
        require(0 <= self.id_dropout < 1, self, "id_dropout", self.id_dropout, "must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class StudentConfig(Config):
    """The student MLP and its training; the plain student uses labels only, same settings.

    Students keep the epoch with the best validation NDCG, stopping after ``patience``
    epochs without a better one (0: train every epoch, keep the last).
    """

    hidden: tuple[int, ...] = (64, 32)
    epochs: int = 20
    patience: int = 3
    fold_standardization: bool = False  # True: into the first layer (int8 then suffers)
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        require(len(self.hidden) > 0, self, "hidden", self.hidden, "needs at least one layer")
        require(self.epochs >= 1, self, "epochs", self.epochs, "must be >= 1")
        require(self.patience >= 0, self, "patience", self.patience, "must be >= 0")

    def fit(self, **overrides: Any) -> FitConfig:
        """Return the training loop's settings of this student (``overrides`` replace some)."""
        fields = {
            "epochs": self.epochs,
            "patience": self.patience,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }
        return FitConfig(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class PruneConfig(Config):
    """Structured pruning of hidden units, then gradual magnitude pruning while distilling.

    Sparsity ramps to ``final_sparsity`` over ``ramp_epochs`` epochs in ``updates`` mask
    updates; fine-tuning goes on at that sparsity for at most ``epochs`` epochs in all, and the
    epoch is chosen on validation NDCG, stopping after ``patience`` epochs without a better one.
    """

    structured_fraction: float = 0.5
    final_sparsity: float = 0.5
    epochs: int = 10
    ramp_epochs: int = 4
    patience: int = 3
    lr: float = 3e-4
    updates: int = 10

    def __post_init__(self) -> None:
        require(
            0 <= self.structured_fraction < 1,
            self,
            "structured_fraction",
            self.structured_fraction,
            "in [0, 1)",
        )
        require(0 <= self.final_sparsity < 1, self, "final_sparsity", self.final_sparsity, "[0,1)")
        require(self.epochs >= 1, self, "epochs", self.epochs, "must be >= 1")
        require(
            1 <= self.ramp_epochs <= self.epochs,
            self,
            "ramp_epochs",
            self.ramp_epochs,
            f"must be in [1, epochs={self.epochs}]",
        )
        require(self.patience >= 0, self, "patience", self.patience, "must be >= 0")
        require(self.lr > 0, self, "lr", self.lr, "must be positive")
        require(self.updates >= 1, self, "updates", self.updates, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Int8Config(Config):
    """int8 modes to try, in order of preference, and the gate itself.

    Of the modes that pass the gate, the one with the fewest fp32 fallbacks (then the first
    in ``modes``) is served, unless another passing mode measures at least
    ``latency_margin`` faster on this machine's CPU (``choose_by = "latency"``).
    """

    modes: tuple[str, ...] = ("weights", "static", "dynamic")
    calibration_candidates: int = 4096
    bench_repeats: int = 200
    # "latency": a passing mode at least latency_margin faster (measured here) is served
    # instead of the one with the fewest fp32 fallbacks; "fallbacks": never.
    choose_by: str = "latency"
    latency_margin: float = 0.1
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        require(
            self.choose_by in ("latency", "fallbacks"),
            self,
            "choose_by",
            self.choose_by,
            "'latency' or 'fallbacks'",
        )
        require(0 <= self.latency_margin < 1, self, "latency_margin", self.latency_margin, "[0,1)")
        ok = len(self.modes) > 0 and all(m in MODES for m in self.modes)
        require(ok, self, "modes", self.modes, f"one or more of {MODES}")
        require(self.calibration_candidates >= 1, self, "calibration_candidates", 0, ">= 1")
        require(self.bench_repeats >= 1, self, "bench_repeats", self.bench_repeats, ">= 1")


@dataclasses.dataclass(frozen=True)
class MethodsConfig(Config):
    """The compression table's other methods, each its own step and row.

    ``pseudo_top_k``: pseudo-label distillation learns the teacher's top-k per list as labels.
    ``l1_penalty``: weight of the L1 penalty on the prunable weights while the L1-driven
    pruned student fine-tunes (the magnitude mask at ``prune.final_sparsity`` is taken once,
    at the end of the ramp). ``precision``: the per-layer precisions the precision search
    tries (every layer one of them). ``seeds``: more student seeds for the distilled
    student's seed spread (empty: not measured).
    """

    pseudo_top_k: int = 10
    l1_penalty: float = 1e-4
    precision: tuple[str, ...] = ("int8", "fp16", "fp32")
    seeds: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        require(self.pseudo_top_k >= 1, self, "pseudo_top_k", self.pseudo_top_k, ">= 1")
        require(self.l1_penalty > 0, self, "l1_penalty", self.l1_penalty, "must be > 0")
        ok = len(self.precision) > 0 and all(p in PRECISIONS for p in self.precision)
        require(ok, self, "precision", list(self.precision), f"one or more of {PRECISIONS}")
        require(
            len(set(self.seeds)) == len(self.seeds), self, "seeds", list(self.seeds), "distinct"
        )


@dataclasses.dataclass(frozen=True)
class LatencyConfig(Config):
    """The side-by-side latency benchmark: one thread, ``candidates`` rows per call."""

    candidates: int = 200
    repeats: int = 300
    warmup: int = 20

    def __post_init__(self) -> None:
        require(self.candidates >= 1, self, "candidates", self.candidates, "must be >= 1")
        require(self.repeats >= 1, self, "repeats", self.repeats, "must be >= 1")
        require(self.warmup >= 0, self, "warmup", self.warmup, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    """Every step's config, plus where step outputs are cached and reports written."""

    cache_dir: str = "runs/cache"
    k: int = 10
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text: TextIndexConfig = dataclasses.field(default_factory=TextIndexConfig)
    two_tower: TwoTowerStepConfig = dataclasses.field(default_factory=TwoTowerStepConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    candidates: CandidateConfig = dataclasses.field(default_factory=CandidateConfig)
    teacher: TeacherStepConfig = dataclasses.field(default_factory=TeacherStepConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    int8: Int8Config = dataclasses.field(default_factory=Int8Config)
    methods: MethodsConfig = dataclasses.field(default_factory=MethodsConfig)
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)

    def __post_init__(self) -> None:
        require(self.k >= 1, self, "k", self.k, "must be >= 1")
        require(self.candidates.n >= self.k, self, "k", self.k, "must be <= candidates.n")


SHIPPED_CONFIGS = "configs"  # inside the slimrank package: pipeline.toml, tiny.toml


def shipped_configs() -> dict[str, Path]:
    """Return the configs shipped with the package by name: ``{"pipeline": .../pipeline.toml}``."""
    root = Path(str(resources.files("slimrank") / SHIPPED_CONFIGS))
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def resolve_config(name: str | Path) -> Path:
    """Return the config file ``name`` names: an existing path, else a shipped config's name.

    ``"pipeline"``, ``"pipeline.toml"`` and ``"tiny"`` name shipped configs, so the defaults
    work from any directory. Raises :class:`ConfigError` naming what was tried.
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name.removesuffix(".toml")
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    if path.exists():
        raise ConfigError("", f"{path}: not a file")
    names = ", ".join(shipped)
    raise ConfigError("", f"{path}: no such config file, and not a shipped config ({names})")


def load_config(path: str | Path) -> PipelineConfig:
    """Return the :class:`PipelineConfig` of a TOML file (a path or a shipped config's name).

    Every value is checked before anything runs: a missing file, a TOML syntax error, an
    unknown key, a wrong type or a value out of range is a :class:`ConfigError` whose one-line
    message names the file, the dotted key and what was expected. A relative ``cache_dir`` is
    taken relative to the current directory, not the file.
    """
    file = resolve_config(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{file}: TOML syntax error: {err}") from None
    except OSError as err:
        raise ConfigError("", f"{file}: cannot read: {err.strerror or err}") from None
    try:
        return PipelineConfig.from_dict(data)
    except ConfigError as err:
        raise err.within(str(file)) from None
