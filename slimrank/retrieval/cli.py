"""``slimrank retrieval train`` and ``slimrank retrieval evaluate``: the two-tower model.

``train`` writes into ``--out``: the model (``model.safetensors``, ``model_config.json``) and
``train.json`` (dataset, split seed, training config, best epoch, validation log).
``evaluate`` ranks all items for the validation and test users of that same split, prints the
metrics, and writes ``metrics.json`` and the embedding files of
:mod:`slimrank.retrieval.embeddings` (user vectors pool train + valid items: the test view).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TRAIN_FILE = "train.json"
METRICS_FILE = "metrics.json"
SPLIT_SEED = 2020  # the protocol's split seed (DESIGN.md)


def _sizes(text: str) -> tuple[int, ...]:
    """Parse ``--hidden``: comma-separated layer sizes, empty for none."""
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None


def register(sub: Any) -> None:
    """Add the ``retrieval`` command and its subcommands to ``sub``."""
    parser = sub.add_parser("retrieval", help="two-tower retrieval model: train, evaluate")
    commands = parser.add_subparsers(dest="retrieval_command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a two-tower model on a dataset's train split")
    train.add_argument("--dataset", default="movielens-100k", help="name or path of the logs")
    train.add_argument("--out", required=True, type=Path, help="directory for the model")
    train.add_argument("--seed", type=int, default=0, help="training seed")
    train.add_argument("--split-seed", type=int, default=SPLIT_SEED, help="split seed")
    # The defaults are the recipe tuned on ml-100k valid (README, "Retrieval"): Mult-DAE-style
    # multinomial training, linear towers without projection, unnormalized dot product plus
    # an item bias, history pooled as sum / sqrt(n).
    train.add_argument("--epochs", type=int, default=300, help="maximum epochs")
    train.add_argument("--dim", type=int, default=200, help="output (and embedding) dimension d")
    train.add_argument(
        "--hidden",
        type=_sizes,
        default=(),
        help="comma-separated MLP hidden sizes; empty: linear towers",
    )
    train.add_argument(
        "--projection",
        action="store_true",
        help="a linear layer on top of each tower (implied by --hidden)",
    )
    train.add_argument("--user-id", action="store_true", help="give the user tower a user id")
    train.add_argument("--no-item-bias", action="store_true", help="no learned logit bias per item")
    train.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalize both towers (cosine / --temperature)",
    )
    train.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    train.add_argument(
        "--history-power",
        type=float,
        default=0.5,
        help="history pooled as sum / n ** power: 1 mean, 0.5 L2-normalized multi-hot",
    )
    train.add_argument(
        "--init-std", type=float, default=0.01, help="initial embedding std; 0: N(0, 1)"
    )
    train.add_argument("--loss", default="softmax", help="softmax, sampled_softmax or bpr")
    train.add_argument(
        "--examples",
        default="multinomial",
        help="multinomial, masked or leave_one_out (see slimrank.retrieval.train)",
    )
    train.add_argument("--mask-share", type=float, default=0.2, help="share of items to predict")
    train.add_argument(
        "--batch-size", type=int, default=10_000, help="training items per batch (whole users)"
    )
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument(
        "--history-dropout",
        type=float,
        default=None,
        help="share of the history dropped in training (default 0.5 for multinomial, else 0)",
    )
    train.add_argument("--patience", type=int, default=10, help="early-stopping patience")
    train.add_argument("--eval-every", type=int, default=5, help="epochs between validations")
    train.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="feed the user and item feature columns to the towers (lowered ml-100k valid)",
    )
    train.add_argument(
        "--members",
        type=int,
        default=1,
        help="train this many seeds (--seed, --seed + 1, ...), each --dim / N wide, and keep "
        "their sum as one model (linear towers only)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=train_command)

    evaluate = commands.add_parser(
        "evaluate", help="valid and test metrics of a trained model; write its embeddings"
    )
    evaluate.add_argument("--model", required=True, type=Path, help="directory from train")
    evaluate.add_argument("--out", type=Path, default=None, help="embeddings dir (--model)")
    evaluate.set_defaults(func=evaluate_command)


def train_command(args: argparse.Namespace) -> int:
    """Train, keep the best validation epoch, and save the model."""
    from slimrank.data.dataset import load_dataset, split_random
    from slimrank.errors import SlimrankError
    from slimrank.retrieval.ensemble import ensemble_problem
    from slimrank.retrieval.train import TrainConfig, train_two_tower
    from slimrank.retrieval.two_tower import FeatureSpec, TwoTowerConfig, save_model

    dataset = load_dataset(args.dataset)
    split = split_random(
        dataset.interactions, dataset.n_users, dataset.n_items, seed=args.split_seed
    )
    features = args.features
    history_dropout = args.history_dropout
    if history_dropout is None:
        history_dropout = 0.5 if args.examples == "multinomial" else 0.0
    try:
        hidden = args.hidden
        model_config = TwoTowerConfig(
            n_users=dataset.n_users,
            n_items=dataset.n_items,
            dim=args.dim,
            id_dim=args.dim,
            hidden=hidden,
            projection=bool(hidden) or args.projection,
            use_user_id=args.user_id,
            item_bias=not args.no_item_bias,
            normalize=args.normalize,
            temperature=args.temperature,
            history_power=args.history_power,
            init_std=args.init_std,
            user_features=FeatureSpec.from_table(dataset.user_features)
            if features
            else FeatureSpec(),
            item_features=FeatureSpec.from_table(dataset.item_features)
            if features
            else FeatureSpec(),
        )
        train_config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            loss=args.loss,
            examples=args.examples,
            mask_share=args.mask_share,
            history_dropout=history_dropout,
            patience=args.patience,
            eval_every=args.eval_every,
            seed=args.seed,
            members=args.members,
            progress=not args.no_progress,
        )
        problem = ensemble_problem(model_config, train_config.members)
        if problem:
            raise SlimrankError(f"--members {args.members} with --dim {args.dim}: {problem}")
    except ValueError as err:  # a bad flag value: say which, without a traceback
        raise SlimrankError(str(err)) from err
    result = train_two_tower(
        model_config, train_config, split, dataset.user_features, dataset.item_features
    )
    save_model(result.model, args.out)
    record = {
        "dataset": args.dataset,
        "split_seed": args.split_seed,
        "train_config": train_config.to_dict(),
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "log": result.log,
    }
    (args.out / TRAIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _print_metrics({"valid": result.best_valid}, f"best epoch {result.best_epoch}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Print valid and test metrics of a saved model; write metrics and embeddings."""
    from slimrank.data.dataset import load_dataset, split_random
    from slimrank.errors import SlimrankError
    from slimrank.retrieval.embeddings import (
        Embeddings,
        export_embeddings,
        history_for,
        save_embeddings,
    )
    from slimrank.retrieval.train import evaluate_model
    from slimrank.retrieval.two_tower import load_model

    record_path = args.model / TRAIN_FILE
    if not record_path.exists():
        raise SlimrankError(f"{record_path} not found: is {args.model} a `retrieval train` output?")
    record = json.loads(record_path.read_text())
    model = load_model(args.model)
    dataset = load_dataset(record["dataset"])
    split = split_random(
        dataset.interactions, dataset.n_users, dataset.n_items, seed=record["split_seed"]
    )
    features = {"user_features": dataset.user_features, "item_features": dataset.item_features}
    metrics = {view: evaluate_model(model, split, view, **features) for view in ("valid", "test")}
    history = history_for(split, "test", model.config.max_history)
    user_vecs, item_vecs = export_embeddings(model, history, **features)
    out = args.out or args.model
    save_embeddings(out, Embeddings(user_vecs, item_vecs, dataset.users.ids, dataset.items.ids))
    (Path(out) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    _print_metrics(metrics, f"{record['dataset']}, exact dot-product search, full ranking")
    return 0


def _print_metrics(metrics: dict[str, dict[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [k for k in next(iter(metrics.values())) if k != "users"]
    table = Table(title=f"two-tower: {title}")
    table.add_column("part")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("users", justify="right")
    for part, values in metrics.items():
        table.add_row(part, *(f"{values[n]:.4f}" for n in names), str(int(values.get("users", 0))))
    Console().print(table)
