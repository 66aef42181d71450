"""``slimrank data fetch`` and ``slimrank data info``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands."""
    data = sub.add_parser("data", help="fetch and inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    fetch = data_sub.add_parser(
        "fetch", help="download a public dataset into $SLIMRANK_DATA (or the user cache)"
    )
    fetch.add_argument("name", choices=["movielens-100k"], help="dataset to fetch")
    fetch.set_defaults(func=_fetch)

    info = data_sub.add_parser("info", help="users, items, interactions, density, date range")
    info.add_argument(
        "dataset",
        nargs="?",
        default="movielens-100k",
        help="movielens-100k or a CSV / Parquet logs file (default: movielens-100k)",
    )
    info.add_argument("--user-features", help="CSV / Parquet user features (logs only)")
    info.add_argument("--item-features", help="CSV / Parquet item features (logs only)")
    info.set_defaults(func=_info)


def _fetch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from slimrank.data.fetch import fetch_movielens_100k

    directory, fetched = fetch_movielens_100k()
    if fetched:
        Console().print(f"fetched {args.name} into {directory}")
    else:
        Console().print(f"{args.name} is already in {directory}; nothing to do")
    return 0


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slimrank.data.dataset import load_dataset
    from slimrank.data.info import dataset_summary
    from slimrank.data.logs import load_logs

    if args.user_features or args.item_features:
        dataset = load_logs(args.dataset, args.user_features, args.item_features)
    else:
        dataset = load_dataset(args.dataset)
    table = Table(title=f"dataset {dataset.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in dataset_summary(dataset).items():
        if key == "density":
            text = f"{value:.4%}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)
    return 0
