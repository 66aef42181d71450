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

    generate = data_sub.add_parser(
        "generate", help="write a synthetic world's logs and feature tables as Parquet"
    )
    generate.add_argument("kind", choices=["world"], help="what to generate")
    generate.add_argument("--users", type=int, default=10_000, help="number of users")
    generate.add_argument("--items", type=int, default=10_000, help="number of items")
    generate.add_argument(
        "--interactions-per-user", type=float, default=20.0, help="mean interactions per user"
    )
    generate.add_argument("--seed", type=int, default=0, help="seed (same seed, same rows)")
    generate.add_argument(
        "--chunk-users", type=int, default=65_536, help="users per written row group"
    )
    generate.add_argument("--out", required=True, help="directory to write")
    generate.set_defaults(func=_generate)

    info = data_sub.add_parser("info", help="users, items, interactions, density, date range")
    info.add_argument(
        "dataset",
        nargs="?",
        default="movielens-100k",
        help="movielens-100k, a CSV / Parquet logs file, or a logs directory "
        "(interactions.parquet with optional users.parquet and items.parquet, as "
        "`data generate world` writes) (default: movielens-100k)",
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


def _generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from slimrank.data.world import WorldConfig, write_world
    from slimrank.errors import SlimrankError

    try:
        config = WorldConfig(
            n_users=args.users,
            n_items=args.items,
            per_user=args.interactions_per_user,
            seed=args.seed,
        )
    except ValueError as err:
        raise SlimrankError(str(err)) from err
    if args.chunk_users < 1:
        raise SlimrankError(f"--chunk-users {args.chunk_users}: must be >= 1")
    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("users", total=config.n_users)
        try:
            counts = write_world(
                config, args.out, args.chunk_users, lambda done, _: bar.update(task, completed=done)
            )
        except NotADirectoryError as err:
            raise SlimrankError(f"--out {err}") from err
    console.print(
        f"wrote {counts['interactions']:,} interactions of {counts['users']:,} users over "
        f"{counts['items']:,} items to {args.out}"
    )
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
