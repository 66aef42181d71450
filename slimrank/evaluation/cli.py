"""``slimrank baseline``: most-popular (and EASE) on a split, beside RecBole's anchors."""

from __future__ import annotations

import argparse

COLUMNS = ("recall@10", "ndcg@10", "mrr@10", "hit@10", "precision@10")
HEADERS = ("Recall@10", "NDCG@10", "MRR@10", "Hit@10", "Prec@10")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``baseline`` command."""
    parser = sub.add_parser(
        "baseline",
        help="evaluate most-popular (and EASE) with the shared protocol",
        description="Most-popular (train counts) and EASE (l2 tuned on valid), evaluated by "
        "full ranking on valid and test, printed beside RecBole 1.2.1's test anchors.",
    )
    parser.add_argument("--dataset", default="movielens-100k", help="name or logs file")
    parser.add_argument("--seed", type=int, default=2020, help="split seed (default 2020)")
    parser.add_argument("--no-ease", action="store_true", help="skip the EASE baseline")
    parser.add_argument(
        "--ease-l2",
        type=float,
        nargs="+",
        default=[100.0, 250.0, 500.0, 1000.0],
        help="EASE l2 values tried on valid (default: 100 250 500 1000)",
    )
    parser.set_defaults(func=_baseline)


def _baseline(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from slimrank.data.dataset import load_dataset, split_random
    from slimrank.evaluation.baselines import RECBOLE_ANCHORS, evaluate_most_popular, tune_ease

    console = Console()
    dataset = load_dataset(args.dataset)
    split = split_random(dataset.interactions, dataset.n_users, dataset.n_items, seed=args.seed)
    rows: list[tuple[str, str, dict[str, float]]] = []
    timings: list[str] = []
    pop = evaluate_most_popular(split)
    rows += [("MostPop", "valid", pop["valid"]), ("MostPop", "test", pop["test"])]
    timings.append(f"MostPop test evaluation {pop['test_seconds'] * 1000:.0f} ms")
    if not args.no_ease:
        with console.status("EASE: tuning l2 on valid"):
            config, ease, trials = tune_ease(split, args.ease_l2)
        name = f"EASE l2={config.l2:g}"
        rows += [(name, "valid", ease["valid"]), (name, "test", ease["test"])]
        tried = ", ".join(f"{l2:g}: {v:.4f}" for l2, v in trials.items())
        timings.append(f"EASE valid NDCG@10 by l2: {tried}")
        timings.append(f"EASE test evaluation {ease['test_seconds'] * 1000:.0f} ms")
    if dataset.name == "movielens-100k":
        rows += [(f"RecBole {m}", "test", v) for m, v in RECBOLE_ANCHORS.items()]

    title = (
        f"{dataset.name}: full ranking, per-user random 80/10/10 split, seed {args.seed} "
        f"({len(split.train):,} / {len(split.valid):,} / {len(split.test):,})"
    )
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    table.add_column("part")
    for header in HEADERS:
        table.add_column(header, justify="right", no_wrap=True)
    for model, part, metrics in rows:
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in COLUMNS]
        table.add_row(model, part, *cells)
    console.print(table)
    for line in timings:
        console.print(line)
    return 0
