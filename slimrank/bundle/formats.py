"""Safe readers and writers for the file formats a bundle may hold; nothing here unpickles.

Arrays as ``.npy`` (``allow_pickle=False``), named tensors as safetensors, tables as Parquet,
small documents as strict JSON. A reader raises ``IntegrityError`` naming the file when the
bytes are not a valid file of its format (for example an object array in a ``.npy``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from slimrank.errors import IntegrityError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy``; ``ValueError`` for object arrays, which would need pickle."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ValueError(f"{path}: object arrays cannot be stored without pickle")
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def read_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Return the array in a ``.npy`` file, memory-mapped read-only if ``mmap``."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError) as err:
        raise IntegrityError(f"{path}: not a valid pickle-free .npy file: {err}") from None


def write_tensors(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Write named numpy arrays or torch tensors as one safetensors file.

    ``metadata`` is a flat ``str -> str`` map stored in the file header.
    """
    from safetensors.numpy import save_file

    arrays = {}
    for name, value in tensors.items():
        if hasattr(value, "detach"):  # torch.Tensor; avoids importing torch here
            value = value.detach().cpu().contiguous().numpy()
        arrays[name] = np.ascontiguousarray(value)
    save_file(arrays, str(path), metadata=dict(metadata) if metadata else None)


# A tensor is copied out of a safetensors file in pieces of about this many bytes: the copy
# holds the GIL, and a server reloading a 1M-item bundle on one thread while its event loop
# answers calls on another stalled the loop for up to 0.44 s on one whole-tensor copy.
TENSOR_CHUNK_BYTES = 8 << 20


def read_tensor_np(handle: Any, name: str, chunk_bytes: int = TENSOR_CHUNK_BYTES) -> np.ndarray:
    """Return tensor ``name`` of an open ``safe_open(..., framework="np")`` handle, copied in
    blocks of rows (of elements, for a vector) of about ``chunk_bytes`` so that no one copy
    holds the GIL for long."""
    piece = handle.get_slice(name)
    shape = tuple(piece.get_shape())
    if not shape or shape[0] < 2:
        return handle.get_tensor(name)
    first = piece[0:1]
    rows = max(1, chunk_bytes // max(1, first.nbytes))
    if rows >= shape[0]:
        return handle.get_tensor(name)
    out = np.empty(shape, dtype=first.dtype)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])  # safetensors' slices do not clamp
        out[start:stop] = piece[start:stop]
    return out


def read_tensors(path: str | Path, framework: Literal["np", "pt"] = "np") -> dict[str, Any]:
    """Return ``{name: tensor}`` from a safetensors file as numpy arrays or torch tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            if framework == "np":
                return {name: read_tensor_np(f, name) for name in f.keys()}  # noqa: SIM118
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise IntegrityError(f"{path}: not a valid safetensors file: {err}") from None


def read_tensors_metadata(path: str | Path) -> dict[str, str]:
    """Return the ``str -> str`` metadata stored in a safetensors header (empty if none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise IntegrityError(f"{path}: not a valid safetensors file: {err}") from None


def write_table(path: str | Path, table: pa.Table | pd.DataFrame) -> None:
    """Write a pyarrow Table or pandas DataFrame as Parquet (DataFrame index not kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, str(path))


def read_table(path: str | Path) -> pa.Table:
    """Return the Parquet file at ``path`` as a pyarrow Table (``.to_pandas()`` for pandas)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(str(path))
    except pa.ArrowInvalid as err:
        raise IntegrityError(f"{path}: not a valid Parquet file: {err}") from None


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict, sorted, indented UTF-8 JSON (``ValueError`` on NaN)."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Return the parsed JSON document at ``path``; NaN and infinities are refused."""
    try:
        return json.loads(Path(path).read_bytes().decode(), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise IntegrityError(f"{path}: not valid JSON: {err}") from None
