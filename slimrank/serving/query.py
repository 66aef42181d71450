"""``slimrank query``: ask a running server for one user's recommendations and print them.

Prints rank, item id, title and score in a table, then the model version that ranked them.
Titles come from the bundle's dataset when ``--bundles`` is given and the bundle was trained
on MovieLens-100k (read from the local data cache, never downloaded here). Exit codes: 0
answered, 2 server unreachable or request refused (INVALID_ARGUMENT), 1 any other gRPC error.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from slimrank.search.filters import ItemFilter
    from slimrank.serving.client import Ranked

log = logging.getLogger(__name__)

MOVIELENS = ("movielens-100k", "ml-100k")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``query`` command."""
    p = sub.add_parser(
        "query",
        help="print one user's recommendations from a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT (%(default)s)")
    p.add_argument("--user", default="", help="user id (empty or unknown: use --recent)")
    p.add_argument("-k", type=int, default=10, help="items to return (default %(default)s)")
    p.add_argument(
        "--recent", default="", help="comma-separated item ids the user just interacted with"
    )
    p.add_argument(
        "--search", default="", help="search for this text (ranked for --user / --recent)"
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="FIELD=VALUES",
        help="item attribute filter, repeatable: genre=Comedy|Drama or release_year=1990..1999",
    )
    p.add_argument("--bundles", type=Path, default=None, help="bundles directory, for titles")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per call (default %(default)s)"
    )
    p.add_argument(
        "--tls-ca", type=Path, help="call over TLS, trusting this CA's PEM (default: plaintext)"
    )
    p.add_argument("--tls-cert", type=Path, help="client certificate PEM, for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="the client certificate's key PEM")
    p.set_defaults(func=cmd_query, parser=p)


def bundle_titles(root: Path, version: str | None = None) -> dict[str, str] | None:
    """Return ``{item id: title}`` for a bundle, or None if its dataset has no titles here.

    Reads ``version`` (None or absent from ``root``: ``CURRENT``): a bundle trained on
    MovieLens-100k takes the titles of the cached dataset; other sources have none.
    """
    from slimrank.bundle.manifest import MANIFEST, read_manifest
    from slimrank.bundle.store import resolve_version
    from slimrank.data.fetch import is_fetched, movielens_dir
    from slimrank.data.titles import read_titles

    if version is None or not (root / version / MANIFEST).is_file():
        version = resolve_version(root, None)
    catalog_titles = root / version / "catalog" / "titles.npy"
    if catalog_titles.is_file():  # the bundle's own display titles (any catalog)
        from slimrank.bundle.formats import read_npy

        ids = read_npy(root / version / "items.npy")
        return dict(zip(ids.tolist(), read_npy(catalog_titles).tolist(), strict=True))
    manifest = read_manifest(root / version / MANIFEST)
    data = manifest.config.get("data", {})
    source = data.get("source") if isinstance(data, dict) else None
    if source not in MOVIELENS:
        log.debug("bundle %s was trained on %r: no titles", version, source)
        return None
    if not is_fetched():
        log.warning("movielens-100k is not in the data cache: no titles (slimrank data fetch)")
        return None
    return read_titles(movielens_dir() / "ml-100k.item")  # not load_dataset: no pandas here


def recommendation_table(
    ranked: Ranked, titles: Mapping[str, str] | None = None, title: str = ""
) -> Table:
    """Return a rich table of ``ranked``: rank, item id, title (if known) and score."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title) if title else None, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("item", justify="right")
    if titles is not None:
        table.add_column("title")
    table.add_column("score", justify="right")
    for rank, (item, score) in enumerate(zip(ranked.item_ids, ranked.scores, strict=True), 1):
        row = [Text(str(rank)), Text(item)]  # Text: ids and titles are not rich markup
        if titles is not None:
            row.append(Text(titles.get(item, "?")))
        table.add_row(*row, Text(f"{score:.4f}"))
    return table


def describe(user: str, ranked: Ranked) -> str:
    """Return a one-line title: who was asked and how the server knew them."""
    who = f"user {user}" if user else "anonymous user"
    source = f" ({ranked.user_source.lower()})" if ranked.user_source else ""
    return f"{who}{source}: {ranked.candidates} candidates ranked"


def print_recommendations(
    console: Console, user: str, ranked: Ranked, titles: Mapping[str, str] | None = None
) -> None:
    """Print who was asked, the model version that answered, then the table."""
    line = f"{describe(user, ranked)} by model {ranked.model_version}"
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(recommendation_table(ranked, titles))


def cmd_query(args: argparse.Namespace) -> int:
    """Query the server once and print the table; see the module docstring for exit codes."""
    import sys

    import grpc
    from rich.console import Console

    from slimrank.serving.client import SlimrankClient
    from slimrank.serving.security import checked_channel_credentials

    if args.k < 1:
        args.parser.error(f"-k {args.k}: must be >= 1")
    recent = [item.strip() for item in args.recent.split(",") if item.strip()]
    try:
        filters = [parse_filter(text) for text in args.filter]
    except ValueError as error:
        args.parser.error(str(error))
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None or args.tls_key is not None:
        try:  # a client certificate alone means TLS with the system's roots
            tls = checked_channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except ValueError as error:
            args.parser.error(str(error))
    err = Console(file=sys.stderr, markup=False, highlight=False)
    try:
        with SlimrankClient(args.target, timeout=args.timeout, retries=3, tls=tls) as client:
            if args.search:
                ranked = client.search_text(
                    args.search, args.k, args.user, recent=recent, filters=filters
                )
            else:
                ranked = client.recommend(args.user, args.k, recent=recent, filters=filters)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            err.print(
                f"slimrank query: server {args.target} unreachable: {details}", soft_wrap=True
            )
            return 2
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            err.print(f"slimrank query: request refused: {details}", soft_wrap=True)
            return 2
        err.print(f"slimrank query: {code.name}: {details}", soft_wrap=True)
        return 1
    titles = None
    if args.bundles is not None:
        titles = bundle_titles(args.bundles, ranked.model_version)
    if args.search:
        console = Console()
        who = f"user {args.user}" if args.user else "no user"
        line = (
            f"search {args.search!r} for {who} ({ranked.user_source.lower()}): "
            f"{ranked.candidates} matches ranked by model {ranked.model_version}"
        )
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        console.print(recommendation_table(ranked, titles))
        return 0
    print_recommendations(Console(), args.user, ranked, titles)
    return 0


def parse_filter(text: str) -> ItemFilter:
    """Return the filter of ``FIELD=V1|V2`` (any of the labels) or ``FIELD=LOW..HIGH``."""
    from slimrank.search.filters import ItemFilter

    field, sep, values = text.partition("=")
    if not sep or not field or not values:
        raise ValueError(f"--filter {text!r}: expected FIELD=VALUES")
    low, dots, high = values.partition("..")
    if dots:
        try:
            return ItemFilter(
                field, low=float(low) if low else None, high=float(high) if high else None
            )
        except ValueError:
            raise ValueError(f"--filter {text!r}: LOW..HIGH must be numbers") from None
    return ItemFilter(field, values=tuple(v for v in values.split("|") if v))
