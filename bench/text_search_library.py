"""Which lexical library: bm25s, tantivy, or BM25 on scipy.sparse, on ml-100k's item texts.

For each: build time, bytes on disk, whether it saves without pickle, install size, and the
p50 / p99 of one query (top 10 over all 1,682 items) for words, a prefix being typed and a
typo. The documents are the search catalog's (title, year, genres). tantivy is installed by
hand for this comparison only (``pip install tantivy``); it is no dependency of slimrank.

    .venv/bin/python bench/text_search_library.py [--bundles runs/demo/bundles]

Writes ``bench/results/text_search_library.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
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
QUERIES = {
    "words": ["star wars ", "godfather ", "comedy ", "toy story ", "romance 1995 "],
    "prefix": ["star wa", "godf", "shaw", "toy st", "sci"],
    "typo": ["godfater ", "shawshenk ", "comdy ", "starr wars ", "titanc "],
}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def install_bytes(dist: str) -> int:
    files = md.distribution(dist).files or []
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += Path(f.locate()).stat().st_size
    return total


def timed(fn: Any, queries: list[str], repeats: int) -> dict[str, float]:
    ms = []
    for _ in range(repeats):
        for q in queries:
            t0 = time.perf_counter()
            fn(q)
            ms.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def ours(docs: list[str], tmp: Path, repeats: int) -> dict[str, Any]:
    """bm25s builds the weights; the served index expands prefixes and typos (rapidfuzz)."""
    from slimrank.search.catalog import Catalog, save_catalog
    from slimrank.search.filters import ItemAttributes
    from slimrank.search.text_index import build_text_index

    t0 = time.perf_counter()
    index = build_text_index(docs)
    build = time.perf_counter() - t0
    save_catalog(tmp / "ours", Catalog(index, ItemAttributes(len(docs)), np.asarray(docs)))

    def query(q: str) -> np.ndarray:
        scores = index.score(q)
        return np.argpartition(-scores, 10)[:10]

    return {
        "build_s": build,
        "bytes": dir_bytes(tmp / "ours") - (tmp / "ours" / "titles.npy").stat().st_size,
        "pickle_free": "yes (safetensors + JSON)",
        "prefix_support": "yes (last word, vocabulary range)",
        "typo_support": "yes (OSA distance over the vocabulary)",
        **{kind: timed(query, qs, repeats) for kind, qs in QUERIES.items()},
    }


def bm25s_alone(docs: list[str], tmp: Path, repeats: int) -> dict[str, Any]:
    import bm25s

    from slimrank.search.tokens import tokenize

    t0 = time.perf_counter()
    retriever = bm25s.BM25(method="lucene")
    tokens = [tokenize(d) for d in docs]
    vocab = {t: i for i, t in enumerate(sorted({t for d in tokens for t in d}))}
    retriever.index(
        bm25s.tokenization.Tokenized([[vocab[t] for t in d] for d in tokens], vocab),
        show_progress=False,
    )
    build = time.perf_counter() - t0
    retriever.save(tmp / "bm25s")

    def query(q: str) -> Any:
        known = [t for t in tokenize(q) if t in vocab]  # exact words only: no prefix, no typo
        return retriever.get_scores(known) if known else None

    return {
        "build_s": build,
        "bytes": dir_bytes(tmp / "bm25s"),
        "pickle_free": "yes (npy + JSON)",
        "prefix_support": "no",
        "typo_support": "no",
        **{kind: timed(query, qs, repeats) for kind, qs in QUERIES.items()},
    }


def tantivy_index(docs: list[str], tmp: Path, repeats: int) -> dict[str, Any]:
    import tantivy

    t0 = time.perf_counter()
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("text", stored=False)
    builder.add_unsigned_field("row", stored=True)
    schema = builder.build()
    (tmp / "tantivy").mkdir()
    index = tantivy.Index(schema, path=str(tmp / "tantivy"))
    writer = index.writer(heap_size=15_000_000, num_threads=1)
    for i, d in enumerate(docs):
        writer.add_document(tantivy.Document(text=d, row=i))
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    build = time.perf_counter() - t0
    searcher = index.searcher()

    def query(q: str) -> Any:
        words = q.split()
        if not words:
            return None
        if not q.endswith(" "):  # the last word as a prefix: a regex on the term
            words[-1] = words[-1] + "*"
        parsed = index.parse_query(
            " ".join(words), ["text"], fuzzy_fields={"text": (True, 1, True)}
        )
        return searcher.search(parsed, 10).hits

    return {
        "build_s": build,
        "bytes": dir_bytes(tmp / "tantivy"),
        "pickle_free": "yes (its own segment files)",
        "prefix_support": "yes (query syntax)",
        "typo_support": "yes (fuzzy terms, Levenshtein)",
        **{kind: timed(query, qs, repeats) for kind, qs in QUERIES.items()},
    }


def main() -> int:
    from slimrank.bundle import open_bundle
    from slimrank.search.build import item_documents
    from slimrank.search.catalog import load_catalog_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundles", type=Path, default=ROOT / "runs" / "demo" / "bundles")
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    bundle = open_bundle(args.bundles)
    catalog = load_catalog_dir(bundle.path / "catalog")
    docs, _ = item_documents({"title": catalog.titles}, catalog.attributes)
    libs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        libs["bm25s weights + own expansion (chosen)"] = ours(docs, root, args.repeats)
        libs["bm25s alone"] = bm25s_alone(docs, root, args.repeats)
        try:
            libs["tantivy"] = tantivy_index(docs, root, args.repeats)
        except ImportError:
            libs["tantivy"] = {"error": "not installed (pip install tantivy)"}
    sizes = {}
    for dist in ("bm25s", "rapidfuzz", "tantivy"):
        try:
            sizes[dist] = install_bytes(dist)
        except md.PackageNotFoundError:
            sizes[dist] = None
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cpu": cpu_features(),
        "items": len(docs),
        "libraries": libs,
        "install_bytes": sizes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_search_library.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "text_search_library.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    la = ", ".join(f"{x:.2f}" for x in r["load_average"])
    lines = [
        "# Lexical library for text search (`bench/text_search_library.py`)",
        "",
        f"{r['date']}; {r['items']} ml-100k items; load average {la} (shared 2-core machine); "
        f"CPU {r['cpu']['model']} ({', '.join(r['cpu']['flags'])}).",
        "",
        "| library | build s | bytes | pickle-free | prefix | typo | words p50/p99 ms "
        "| prefix p50/p99 ms | typo p50/p99 ms |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for name, v in r["libraries"].items():
        if "error" in v:
            lines.append(f"| {name} | {v['error']} |")
            continue
        q = " | ".join(
            f"{v[k]['p50_ms']:.3f} / {v[k]['p99_ms']:.3f}" for k in ("words", "prefix", "typo")
        )
        lines.append(
            f"| {name} | {v['build_s']:.3f} | {v['bytes']:,} | {v['pickle_free']} | "
            f"{v['prefix_support']} | {v['typo_support']} | {q} |"
        )
    sizes = ", ".join(
        f"{k} {v / 1e6:.1f} MB" if v else f"{k} -" for k, v in r["install_bytes"].items()
    )
    lines += ["", f"Installed size: {sizes}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
