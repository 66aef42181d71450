"""Round trips of the safe readers and writers, and refusal of pickled or broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from slimrank.bundle.formats import (
    read_json,
    read_npy,
    read_table,
    read_tensors,
    read_tensors_metadata,
    read_tensors_np,
    write_json,
    write_npy,
    write_table,
    write_tensors,
)
from slimrank.errors import IntegrityError


def test_npy_round_trip_and_mmap(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(read_npy(tmp_path / "a.npy"), a)
    m = read_npy(tmp_path / "a.npy", mmap=True)
    assert isinstance(m, np.memmap)
    np.testing.assert_array_equal(m, a)


def test_npy_refuses_objects_both_ways(tmp_path):
    objects = np.array([{"x": 1}, None], dtype=object)
    with pytest.raises(ValueError, match="pickle"):
        write_npy(tmp_path / "o.npy", objects)
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)  # a pickled file from elsewhere
    with pytest.raises(IntegrityError, match=r"o\.npy"):
        read_npy(tmp_path / "o.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x80\x04not an npy")
    with pytest.raises(IntegrityError, match=r"junk\.npy"):
        read_npy(tmp_path / "junk.npy")
    write_npy(tmp_path / "short.npy", np.arange(100))
    os.truncate(tmp_path / "short.npy", 200)  # header intact, data cut
    for mmap in (False, True):
        with pytest.raises(IntegrityError, match=r"short\.npy"):
            read_npy(tmp_path / "short.npy", mmap=mmap)
    with pytest.raises(FileNotFoundError):
        read_npy(tmp_path / "absent.npy")


def test_tensors_round_trip_numpy_and_torch(tmp_path):
    emb = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    ids = torch.arange(5, dtype=torch.int64)
    write_tensors(tmp_path / "t.safetensors", {"emb": emb, "ids": ids}, metadata={"dim": "3"})
    got = read_tensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(got["emb"], emb)
    np.testing.assert_array_equal(got["ids"], ids.numpy())
    pt = read_tensors(tmp_path / "t.safetensors", framework="pt")
    assert torch.equal(pt["ids"], ids)
    assert read_tensors_metadata(tmp_path / "t.safetensors") == {"dim": "3"}


def test_tensors_refuse_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(IntegrityError, match=r"bad\.safetensors"):
        read_tensors(path)


def test_table_round_trip(tmp_path):
    df = pd.DataFrame({"item": [3, 1, 2], "genre": ["a", "b", "c"]}, index=[10, 11, 12])
    write_table(tmp_path / "t.parquet", df)
    back = read_table(tmp_path / "t.parquet").to_pandas()
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(IntegrityError, match=r"bad\.parquet"):
        read_table(tmp_path / "bad.parquet")


def test_json_is_strict(tmp_path):
    write_json(tmp_path / "j.json", {"b": [1, 2], "a": None})
    assert read_json(tmp_path / "j.json") == {"a": None, "b": [1, 2]}
    with pytest.raises(ValueError):
        write_json(tmp_path / "n.json", {"x": float("nan")})
    (tmp_path / "n.json").write_text('{"x": NaN}')
    with pytest.raises(IntegrityError, match=r"n\.json"):
        read_json(tmp_path / "n.json")


def test_tensors_read_without_the_library_copy_equal_the_librarys_reads(tmp_path: Path) -> None:
    """read_tensors_np reads each tensor's bytes itself (without the GIL); every dtype and
    shape must come back as the library reads it, and ``keep`` picks tensors by name."""
    rng = np.random.default_rng(0)
    tensors = {
        "rows": rng.standard_normal((1000, 7)).astype(np.float32),
        "cube": rng.integers(-9, 9, (333, 5, 2)).astype(np.int64),
        "vector": np.arange(5, dtype=np.int32),
        "long_vector": rng.standard_normal(2001).astype(np.float64),
        "one_row": rng.standard_normal((1, 3)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float16),
        "flags": rng.random(17) > 0.5,
        "bytes": rng.integers(0, 255, (4, 4)).astype(np.uint8),
        "small": rng.integers(-100, 100, 9).astype(np.int8),
        "shorts": rng.integers(0, 60000, 9).astype(np.uint16),
        "words": rng.integers(0, 2**32 - 1, 9, dtype=np.uint64).astype(np.uint32),
    }
    path = tmp_path / "t.safetensors"
    write_tensors(path, tensors)
    got = read_tensors_np(path)
    assert set(got) == set(tensors)
    with safe_open(str(path), framework="np") as handle:
        for name, tensor in tensors.items():
            whole = handle.get_tensor(name)
            assert got[name].dtype == whole.dtype == tensor.dtype, name
            assert got[name].shape == whole.shape == tensor.shape, name
            assert np.array_equal(got[name], whole), name
    picked = read_tensors_np(path, lambda name: name.startswith("r"))
    assert set(picked) == {"rows"}
    np.testing.assert_array_equal(picked["rows"], tensors["rows"])


def test_tensors_refuse_a_file_cut_inside_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    write_tensors(path, {"a": np.arange(100, dtype=np.float64)})
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(IntegrityError, match=r"cut\.safetensors"):
        read_tensors_np(path)
