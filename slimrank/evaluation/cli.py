"""``slimrank baseline``: the peers under equal information, beside RecBole's anchors."""

from __future__ import annotations

import argparse
import dataclasses

COLUMNS = ("recall@10", "ndcg@10", "mrr@10", "hit@10", "precision@10")
HEADERS = ("Recall@10", "NDCG@10", "MRR@10", "Hit@10", "Prec@10")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``baseline`` command."""
    parser = sub.add_parser(
        "baseline",
        help="evaluate the peers (most popular, EASE, item-KNN, RP3beta, ALS) with the protocol",
        description="Each peer's hyperparameters are chosen on validation (fit on train); the "
        "chosen setting is refitted on train + valid to score test, what every system may "
        "read there. Printed beside RecBole 1.2.1's test anchors (a different random split).",
    )
    parser.add_argument("--dataset", default="movielens-100k", help="name or logs file")
    parser.add_argument("--seed", type=int, default=2020, help="split seed (default 2020)")
    parser.add_argument(
        "--quick", action="store_true", help="try only the first setting of each peer's grid"
    )
    parser.set_defaults(func=_baseline)


def _baseline(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slimrank.data.dataset import load_dataset, split_random
    from slimrank.evaluation.baselines import RECBOLE_ANCHORS
    from slimrank.evaluation.peers import (
        PEERS,
        evaluate_peer,
        fit_ease,
        format_params,
        peers_for,
        protocol_check,
    )

    console = Console()
    if not console.is_terminal:  # a log or a pipe: print whole rows rather than folding them
        console = Console(width=150)
    dataset = load_dataset(args.dataset)
    split = split_random(dataset.interactions, dataset.n_users, dataset.n_items, seed=args.seed)
    peers, skipped = peers_for(dataset.n_items, PEERS)
    if args.quick:
        peers = tuple(
            dataclasses.replace(p, grid={k: v[:1] for k, v in p.grid.items()}) for p in peers
        )
    rows: list[tuple[str, str, str, dict[str, float]]] = []
    notes: list[str] = [f"Not run: {'; '.join(skipped)}."] if skipped else []
    found = {}
    for peer in peers:
        with console.status(f"{peer.name}: {len(peer.settings())} settings on valid"):
            res = evaluate_peer(peer, split)
        found[res.name] = res
        chosen = format_params(res.params)
        rows += [(res.name, chosen, "valid", res.valid), (res.name, chosen, "test", res.test)]
        if len(res.trials) > 1:
            values = [v for _, v in res.trials]
            grid = "; ".join(f"{k} in {list(v)}" for k, v in peer.grid.items())
            notes.append(
                f"{res.name}: {len(values)} settings ({grid}), valid NDCG@10 "
                f"{min(values):.4f}-{max(values):.4f}"
            )
    if dataset.name == "movielens-100k":
        ease = found["EASE"]
        check = protocol_check(fit_ease, ease.params, split)
        rows.append(
            ("EASE reading train only (protocol check)", format_params(ease.params), "test", check)
        )
        rows += [
            (f"RecBole 1.2.1 {m} (anchor, own split)", "-", "test", v)
            for m, v in RECBOLE_ANCHORS.items()
        ]

    title = (
        f"{dataset.name}: full ranking, per-user random 80/10/10 split, seed {args.seed} "
        f"({len(split.train):,} / {len(split.valid):,} / {len(split.test):,}); chosen on "
        "valid (fit on train), test fitted on train + valid"
    )
    console.print(title)  # not the table's title: a wide table would cut it short
    table = Table()
    table.add_column("model", no_wrap=True)
    table.add_column("chosen on valid")
    table.add_column("part")
    for header in HEADERS:
        table.add_column(header, justify="right", no_wrap=True)
    for model, chosen, part, metrics in rows:
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in COLUMNS]
        table.add_row(model, chosen, part, *cells)
    console.print(table)
    for line in notes:
        console.print(line)
    if dataset.name == "movielens-100k":
        console.print(
            "RecBole's rows are on RecBole's own random split, with test users scored from "
            "their training rows: they check the protocol (beside our EASE reading train only), "
            "they are not peers."
        )
    return 0
