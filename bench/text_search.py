"""Text search quality on ``make demo``'s ml-100k bundle: known-item and genre queries.

Protocol (README "Text search"), on the bundle's own split (RecBole's 80/10/10, seed 2020):

- **Users**: every user with test items; odd user rows tune the two fusion weights (a grid),
  even rows are the evaluation users. Queries exclude the user's train + valid items (as a
  client would with ``exclude_item_ids``; the same for every method).
- **Known-item search**: for each evaluation user's test items, three queries made from the
  title (year removed): ``first`` its first word; ``prefix`` its first word and the first two
  letters of the second as typed (no trailing space; titles of one word: its first three
  letters); ``typo`` its longest word (>= 4 letters) with one seeded edit (delete, substitute
  or swap two neighbours). Success@10: the item is in the top 10; MRR: 1 / its rank among the
  200 candidates (0 beyond).
- **Genre search**: for each evaluation user and each genre of their test items, the query
  is the genre's name; relevant items are the user's test items of that genre; NDCG@10.
- **Methods**: text + popularity (no user), text only (popularity weight 0), personalized
  (the user's id: the served ranker's scores fused with the text score).
- **Paired bootstrap** over evaluation users (2,000 resamples): 95% CI of the mean per-user
  difference, personalized minus text + popularity.

    .venv/bin/python bench/text_search.py [--bundles runs/demo/bundles]

Writes ``bench/results/text_search.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.serving import cpu_features  # noqa: E402

RESULTS = HERE / "results"
K = 10
BOOTSTRAP_RESAMPLES = 2000
POP_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
RANK_GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def title_words(title: str) -> list[str]:
    """Return the title's words without the trailing ``(year)``."""
    from slimrank.search.tokens import tokenize

    return tokenize(re.sub(r"\(\d{4}\)\s*$", "", title))


def known_item_queries(title: str, rng: np.random.Generator) -> dict[str, str]:
    """Return the ``first``, ``prefix`` and ``typo`` queries of a title (some may be absent)."""
    words = title_words(title)
    if not words:
        return {}
    out = {"first": words[0] + " "}
    out["prefix"] = f"{words[0]} {words[1][:2]}" if len(words) > 1 else words[0][:3]
    longest = max(words, key=len)
    if len(longest) >= 4:
        i = int(rng.integers(0, len(longest) - 1))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            typo = longest[:i] + longest[i + 1 :]
        elif kind == 1:
            others = [c for c in LETTERS if c != longest[i]]
            typo = longest[:i] + others[int(rng.integers(0, len(others)))] + longest[i + 1 :]
        else:
            typo = longest[:i] + longest[i + 1] + longest[i] + longest[i + 2 :]
        if typo != longest:
            out["typo"] = typo + " "
    return out


def ndcg(ranked: np.ndarray, relevant: set[int], k: int = K) -> float:
    gains = [1.0 / np.log2(i + 2) for i, r in enumerate(ranked[:k]) if int(r) in relevant]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), k)))
    return float(sum(gains) / ideal) if ideal else 0.0


class Prepared:
    """One query's candidates with everything fusion needs, computed once."""

    def __init__(self, snapshot: Any, user_row: int, text: str, drop: np.ndarray) -> None:
        from slimrank.serving.snapshot import Retrieved, UserQuery, UserSource
        from slimrank.serving.text_search import text_candidates

        hits = text_candidates(snapshot, text, 200, None, drop)
        self.rows, self.text = hits.rows, hits.text
        self.pop = snapshot.popularity[hits.rows]
        self.ranker = None
        if len(hits):
            vector = snapshot.user_vectors[user_row]
            query = UserQuery(UserSource.KNOWN, user_row, vector)
            retrieval = (snapshot.item_vectors[hits.rows] @ vector).astype(np.float32)
            features = snapshot.featurize(query, Retrieved(hits.rows, retrieval))
            self.ranker = np.asarray(snapshot.score(features), dtype=np.float32).reshape(-1)

    def order(self, max_pop: float, pop_w: float | None, rank_w: float | None) -> np.ndarray:
        from slimrank.serving.text_search import TextSearchConfig, fuse

        if not len(self.rows):
            return self.rows
        if rank_w is not None:
            cfg = TextSearchConfig(ranker_weight=rank_w)
            scores = fuse(self.text, self.ranker, self.pop, max_pop, cfg)
        else:
            cfg = TextSearchConfig(popularity_weight=pop_w or 0.0)
            scores = fuse(self.text, None, self.pop, max_pop, cfg)
        return self.rows[np.argsort(-scores, kind="stable")]


def known_metrics(order: np.ndarray, target: int) -> tuple[float, float]:
    hit = np.flatnonzero(order == target)
    if not hit.size:
        return 0.0, 0.0
    rank = int(hit[0]) + 1
    return float(rank <= K), 1.0 / rank


def main() -> int:
    from slimrank.bundle import open_bundle
    from slimrank.evaluation.paired import PerUser, paired_bootstrap
    from slimrank.pipeline.artifacts import load_split
    from slimrank.serving.loader import load_snapshot

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, default=ROOT / "runs" / "demo" / "bundles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-users", type=int, default=0, help="0: all")
    args = p.parse_args()
    start = time.perf_counter()
    bundle = open_bundle(args.bundles)
    snapshot = load_snapshot(bundle)
    catalog = snapshot.catalog
    if catalog is None:
        raise SystemExit(f"bundle {bundle.version} has no search catalog; publish it again")
    split = load_split(bundle.path / "data" / "split.safetensors")
    seen = split.seen_for_test().tocsr()
    test = split.test_matrix().tocsr()
    genres, labels = catalog.attributes.multi_label["genre"]
    max_pop = float(snapshot.popularity.max())
    rng = np.random.default_rng(args.seed)
    users = [u for u in range(split.n_users) if test.indptr[u + 1] > test.indptr[u]]
    if args.max_users:
        users = users[: args.max_users]
    known: dict[int, list[tuple[str, int, Prepared]]] = {}
    genre_q: dict[int, list[tuple[set[int], Prepared]]] = {}
    for u in users:
        drop = seen.indices[seen.indptr[u] : seen.indptr[u + 1]].astype(np.int64)
        items = test.indices[test.indptr[u] : test.indptr[u + 1]]
        known[u] = []
        for item in items:
            for kind, text in known_item_queries(str(catalog.titles[item]), rng).items():
                known[u].append((kind, int(item), Prepared(snapshot, u, text, drop)))
        genre_q[u] = []
        for g in np.flatnonzero(genres[items].any(axis=0)):
            relevant = {int(i) for i in items if genres[i, g]}
            genre_q[u].append((relevant, Prepared(snapshot, u, labels[g].lower(), drop)))
    prepared_s = time.perf_counter() - start

    def per_user(us: list[int], pop_w: float | None, rank_w: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"success@10": {}, "mrr": {}, "genre_ndcg@10": []}
        for kind in ("first", "prefix", "typo", "all"):
            out["success@10"][kind], out["mrr"][kind] = [], []
        for u in us:
            by_kind: dict[str, list[tuple[float, float]]] = {}
            for kind, target, prep in known[u]:
                m = known_metrics(prep.order(max_pop, pop_w, rank_w), target)
                by_kind.setdefault(kind, []).append(m)
                by_kind.setdefault("all", []).append(m)
            for kind in out["mrr"]:
                ms = by_kind.get(kind)
                out["success@10"][kind].append(np.mean([m[0] for m in ms]) if ms else np.nan)
                out["mrr"][kind].append(np.mean([m[1] for m in ms]) if ms else np.nan)
            gs = [ndcg(prep.order(max_pop, pop_w, rank_w), rel) for rel, prep in genre_q[u]]
            out["genre_ndcg@10"].append(np.mean(gs) if gs else np.nan)
        return out

    def objective(r: dict[str, Any]) -> float:
        return float(np.nanmean(r["mrr"]["all"]) + np.nanmean(r["genre_ndcg@10"]))

    tune = [u for u in users if u % 2 == 1]
    evaluate = [u for u in users if u % 2 == 0]
    pop_scores = {w: objective(per_user(tune, w, None)) for w in POP_GRID}
    rank_scores = {w: objective(per_user(tune, None, w)) for w in RANK_GRID}
    best_pop = max(pop_scores, key=pop_scores.get)
    best_rank = max(rank_scores, key=rank_scores.get)
    methods = {
        "text only": per_user(evaluate, 0.0, None),
        "text + popularity": per_user(evaluate, best_pop, None),
        "personalized": per_user(evaluate, None, best_rank),
    }
    summary: dict[str, Any] = {}
    for name, r in methods.items():
        summary[name] = {
            **{f"success@10 {k}": float(np.nanmean(v)) for k, v in r["success@10"].items()},
            **{f"mrr {k}": float(np.nanmean(v)) for k, v in r["mrr"].items()},
            "genre ndcg@10": float(np.nanmean(r["genre_ndcg@10"])),
        }
    diffs: dict[str, Any] = {}
    base, pers = methods["text + popularity"], methods["personalized"]
    for metric, key in (
        ("success@10 all", ("success@10", "all")),
        ("mrr all", ("mrr", "all")),
        ("genre ndcg@10", ("genre_ndcg@10", None)),
    ):
        a = np.asarray(pers[key[0]][key[1]] if key[1] else pers[key[0]], dtype=np.float64)
        b = np.asarray(base[key[0]][key[1]] if key[1] else base[key[0]], dtype=np.float64)
        users = np.flatnonzero(~(np.isnan(a) | np.isnan(b)))
        gain = paired_bootstrap(
            PerUser(users, a[users]), PerUser(users, b[users]), resamples=BOOTSTRAP_RESAMPLES
        )
        diffs[metric] = {"mean_diff": gain.diff, "ci95": [gain.low, gain.high], "users": gain.users}
    n_known = sum(len(v) for u, v in known.items() if u % 2 == 0)
    n_genre = sum(len(v) for u, v in genre_q.items() if u % 2 == 0)
    report = {
        "bundle": bundle.version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cpu": cpu_features(),
        "users": {"tune": len(tune), "evaluate": len(evaluate)},
        "queries_evaluated": {"known_item": n_known, "genre": n_genre},
        "tuning": {
            "popularity_weight": {str(k): v for k, v in pop_scores.items()},
            "ranker_weight": {str(k): v for k, v in rank_scores.items()},
            "chosen": {"popularity_weight": best_pop, "ranker_weight": best_rank},
        },
        "methods": summary,
        "personalized_minus_text_popularity": diffs,
        "seconds": {"prepare": prepared_s, "total": time.perf_counter() - start},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_search.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "text_search.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    cols = ["success@10 first", "success@10 prefix", "success@10 typo", "success@10 all"]
    cols += ["mrr all", "genre ndcg@10"]
    lines = [
        f"# Text search on ml-100k (`bench/text_search.py`, bundle {r['bundle']})",
        "",
        f"{r['date']}; load average {', '.join(f'{x:.2f}' for x in r['load_average'])} "
        f"(shared machine); {r['users']['evaluate']} evaluation users "
        f"({r['queries_evaluated']['known_item']} known-item queries, "
        f"{r['queries_evaluated']['genre']} genre queries), {r['users']['tune']} tuning users.",
        f"Chosen on the tuning users: popularity weight "
        f"{r['tuning']['chosen']['popularity_weight']}, ranker weight "
        f"{r['tuning']['chosen']['ranker_weight']}.",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, m in r["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    lines += ["", "Personalized minus text + popularity, paired bootstrap over users:", ""]
    lines += ["| metric | mean difference | 95% CI | users |", "|---|---:|---|---:|"]
    for metric, d in r["personalized_minus_text_popularity"].items():
        lo, hi = d["ci95"]
        ci = f"[{lo:+.4f}, {hi:+.4f}]"
        lines.append(f"| {metric} | {d['mean_diff']:+.4f} | {ci} | {d['users']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
