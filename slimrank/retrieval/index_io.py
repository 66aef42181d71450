"""Save and load a :class:`RetrievalIndex`: FAISS file, id map (.npy) and a JSON sidecar.

Layout of the directory: ``index.faiss`` (FAISS's own format), ``item_ids.npy`` (int64, read
with ``allow_pickle=False``), ``index.json`` (factory string, config, tuned search parameters,
the MIPS-to-L2 transform's ``max_norm`` when the index is built over it; written last).
Loading memory-maps the index where FAISS supports it (IVF array lists become
``OnDiskInvertedLists``); FastScan's block lists and flat codes are read into memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from slimrank.errors import DataError
from slimrank.retrieval.index import IndexConfig, RetrievalIndex
from slimrank.retrieval.mips import parse_transform
from slimrank.retrieval.tuning import TuningResult

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.npy"
META_FILE = "index.json"
FORMAT_VERSION = 1


def save_index(index: RetrievalIndex, directory: str | Path) -> Path:
    """Write ``index`` into ``directory`` (created if missing); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index.faiss_index, str(out / INDEX_FILE))
    np.save(out / IDS_FILE, np.ascontiguousarray(index.item_ids, dtype=np.int64))
    meta = {"format_version": FORMAT_VERSION, **index.info()}
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / META_FILE)
    return out


def load_index(directory: str | Path, mmap: bool = True) -> RetrievalIndex:
    """Read an index written by :func:`save_index` and apply its tuned search parameters."""
    src = Path(directory)
    for name in (META_FILE, INDEX_FILE, IDS_FILE):
        if not (src / name).is_file():
            raise DataError("missing index file", path=src / name)
    try:
        meta = json.loads((src / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err}", path=src / META_FILE) from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
            path=src / META_FILE,
        )
    config = IndexConfig.from_dict(meta["config"])
    try:  # an index.json without "transform" (written before it existed): none
        norm = parse_transform(meta.get("transform"), "transform")
    except ValueError as err:
        raise DataError(str(err), path=src / META_FILE) from err
    index = _read_faiss(src / INDEX_FILE, mmap)
    ids = np.load(src / IDS_FILE, allow_pickle=False)
    extra = 0 if norm is None else 1  # the transform's coordinate
    if index.d != meta["d"] + extra or index.ntotal != meta["ntotal"]:
        raise DataError(
            f"index has d={index.d}, ntotal={index.ntotal}; sidecar says "
            f"d={meta['d']}{' + 1 (transform)' if extra else ''}, ntotal={meta['ntotal']}",
            path=src / INDEX_FILE,
        )
    tuning = None if meta.get("tuning") is None else TuningResult(**meta["tuning"])
    return RetrievalIndex(
        index, ids, config, meta["factory_string"], meta["params"], tuning, mips_norm=norm
    )


def _read_sidecar(directory: str | Path) -> tuple[dict[str, Any], float | None]:
    """Return an index directory's sidecar and its MIPS-to-L2 ``max_norm`` (None: none), or a
    ``DataError`` naming the file."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
        return meta, parse_transform(meta.get("transform"), "transform")
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise DataError(str(err), path=path) from err


def describe_index(directory: str | Path) -> str:
    """Return what an index directory holds, in words: its FAISS factory string, and the
    MIPS-to-L2 transform when it searches over it (``IVF4096,Flat over the MIPS-to-L2
    transform``); read from the sidecar, the index itself is not loaded."""
    meta, transform = _read_sidecar(directory)
    if "factory_string" not in meta:
        raise DataError('no "factory_string"', path=Path(directory) / META_FILE)
    factory = str(meta["factory_string"])
    return factory if transform is None else f"{factory} over the MIPS-to-L2 transform"


def read_transform(directory: str | Path) -> float | None:
    """Return the MIPS-to-L2 ``max_norm`` an index directory's sidecar records (None: none)."""
    return _read_sidecar(directory)[1]


def _read_faiss(path: Path, mmap: bool) -> faiss.Index:
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as err:
            log.info("memory-mapping %s failed (%s); reading it into memory", path, err)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise DataError(f"not a readable FAISS index: {err}", path=path) from err
