"""Safe readers and writers for the file formats a bundle may hold; nothing here unpickles.

Arrays as ``.npy`` (``allow_pickle=False``), named tensors as safetensors, tables as Parquet,
small documents as strict JSON. A reader raises ``IntegrityError`` naming the file when the
bytes are not a valid file of its format (for example an object array in a ``.npy``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
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


# safetensors dtypes numpy holds natively (the format is little-endian); others (BF16, the
# FP8 kinds) are read by the library.
_NUMPY_DTYPES = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
}


def _read_exact(f: Any, view: memoryview, path: str | Path) -> None:
    """Fill ``view`` from the raw file ``f`` (each ``readinto`` is one system call, made
    without the GIL); ``IntegrityError`` if the file ends first."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise IntegrityError(f"{path}: ends inside a tensor")
        done += got


def read_tensors_np(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` of the tensors in a safetensors file (those ``keep`` accepts).

    The library checks the header (dtypes, shapes, byte ranges that tile the data); each
    tensor's bytes are then read straight into its array with ``readinto``, which copies
    without the GIL. The library's own numpy reader copies under the GIL, and a server
    reloading a 1M-item bundle on a thread stalled its event loop for up to 0.17 s at a time
    while it did.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle, open(path, "rb", buffering=0) as f:
            names = [name for name in handle.keys() if keep is None or keep(name)]  # noqa: SIM118
            head = bytearray(8)
            _read_exact(f, memoryview(head), path)
            size = int.from_bytes(head, "little")
            header = json.loads(f.read(size))
            base = 8 + size
            out = {}
            for name in names:
                entry = header[name]
                dtype = _NUMPY_DTYPES.get(entry["dtype"])
                if dtype is None:
                    out[name] = handle.get_tensor(name)
                    continue
                begin, end = entry["data_offsets"]
                array = np.empty(tuple(entry["shape"]), dtype=np.dtype(dtype))
                if array.nbytes != end - begin:  # the library checked it; never trusted blind
                    raise IntegrityError(f"{path}: tensor {name!r} has the wrong byte length")
                if array.nbytes:
                    f.seek(base + begin)
                    _read_exact(f, memoryview(array.reshape(-1).view(np.uint8)), path)
                out[name] = array
            return out
    except SafetensorError as err:
        raise IntegrityError(f"{path}: not a valid safetensors file: {err}") from None


def read_tensors(path: str | Path, framework: Literal["np", "pt"] = "np") -> dict[str, Any]:
    """Return ``{name: tensor}`` from a safetensors file as numpy arrays or torch tensors."""
    if framework == "np":
        return read_tensors_np(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
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
