"""Content keys of the files a step reads from outside the step cache (logs, feature tables).

A file's key is its sha256. Hashing a large log on every run would be slow, so the last hash
of each path is kept in ``inputs.json`` beside the step outputs, with the file's size,
modification and change times (ns) and inode: while all of them match, the stored hash is
reused; any difference re-hashes the file. The change time (``st_ctime_ns``) is set by the
kernel on every write and cannot be set back (``os.utime`` sets only access and modification
times), so a rewrite that keeps the size and restores the mtime is still re-hashed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from slimrank.bundle.checksums import sha256_file
from slimrank.errors import DataError

log = logging.getLogger(__name__)

STORE = "inputs.json"
_STAT = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file: its absolute path, sha256, and whether it differs from the last run's."""

    path: str
    sha256: str
    changed: bool  # the last recorded content of this path was different


class InputDigests:
    """The sha256 of input files, with a ``stat`` fast path kept in ``<root>/inputs.json``."""

    def __init__(self, root: str | Path) -> None:
        self.store = Path(root) / STORE

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.store.read_text())
        except (FileNotFoundError, ValueError):
            return {}  # absent or unreadable: every file is hashed again
        return data if isinstance(data, dict) else {}

    def digest(self, paths: Iterable[str | Path]) -> list[InputFile]:
        """Return the content key of each file (hashing only files whose stat changed)."""
        records = self._load()
        out, dirty = [], False
        for p in paths:
            path = Path(p).resolve()
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise DataError("input file not found", path=p) from None
            stat = [getattr(st, f) for f in _STAT]
            old = records.get(str(path))
            if isinstance(old, dict) and old.get("stat") == stat and "sha256" in old:
                out.append(InputFile(str(path), old["sha256"], changed=False))
                continue
            sha = sha256_file(path)
            changed = isinstance(old, dict) and old.get("sha256") not in (None, sha)
            records[str(path)] = {"stat": stat, "sha256": sha}
            out.append(InputFile(str(path), sha, changed))
            dirty = True
        if dirty:
            self._save(records)
        return out

    def _save(self, records: dict[str, dict]) -> None:
        """Write the store atomically; a concurrent run's records may be lost (re-hashed)."""
        self.store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE}.", dir=self.store.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(records, f, indent=1, sort_keys=True)
            os.replace(tmp, self.store)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
