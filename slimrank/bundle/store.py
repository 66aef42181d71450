"""The bundle store: atomic publish, verified open, promote, rollback and pruning.

Layout of a bundles root::

    bundles/
      CURRENT                         one line: the served version's name
      HISTORY                         JSON lines: every move of CURRENT (publish/promote/rollback)
      v000011-20261122T120000Z/       manifest.json + the files it lists
      v000012-20261122T143000Z/
      .tmp-<uuid>/                    a publish in progress, or left by a killed one
      .lock                           held (flock) by publish, promote and rollback

Invariants:

* A version directory only ever appears by ``os.rename`` of a complete staging directory
  whose files and ``manifest.json`` were fsynced, so a visible version is always complete.
  Only directories named like a version (see ``versions``) and holding ``manifest.json`` are
  listed; ``.tmp-*`` directories are never listed and are removed by the next publish.
* ``CURRENT`` is replaced with ``os.replace`` of a fsynced ``CURRENT.tmp``: a reader sees
  the old or the new name, never a partial one. Readers take no lock.
* A version is never changed after publish (its files are made read-only). Opening it
  verifies the size and sha256 of every file before anything is deserialized, and refuses
  files on disk that the manifest does not list: whatever a loader reads was checksummed.
* Promote and rollback verify the target first, so a corrupt bundle never becomes current.
* Rollback returns to the version that was served before ``CURRENT`` (from ``HISTORY``), not
  to the next-lower sequence number: a version published with ``make_current=False`` (say,
  one that failed the accuracy gate) was never served and is never a rollback target, and a
  version rolled away from is not returned to by the next rollback.
* Pruning keeps the newest ``keep`` versions, ``CURRENT``, and the rollback target; a pruned
  version is renamed to ``.tmp-*`` first, so it disappears from listings atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from slimrank.bundle.checksums import FileDigest, Problem, check_tree, hash_tree
from slimrank.bundle.manifest import MANIFEST, Manifest, check_name, read_manifest
from slimrank.bundle.versions import format_version, parse_version, utc_iso, version_key
from slimrank.config import Config, require
from slimrank.errors import IntegrityError, SlimrankError

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
HISTORY = "HISTORY"
_TMP_PREFIX = ".tmp-"
_LOCK = ".lock"

# What a publish copies into the new version: name -> source file or bytes, or a function
# that writes the files into the staging directory it is given.
Source = Mapping[str, str | os.PathLike[str] | bytes] | Callable[[Path], None]


class BundleError(SlimrankError):
    """A bundle operation that cannot be done: no such version, nothing to roll back to."""


class VersionNotFound(BundleError, LookupError):
    """No published version has the name asked for (``Admin.Reload`` answers NOT_FOUND)."""


@dataclasses.dataclass(frozen=True)
class StoreConfig(Config):
    """How many versions a store keeps. ``CURRENT`` and its predecessor are always kept."""

    keep: int = 5

    def __post_init__(self) -> None:
        require(
            isinstance(self.keep, int) and self.keep >= 1, self, "keep", self.keep, "must be >= 1"
        )


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle version: its directory, manifest and the paths of its files."""

    version: str
    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Return the path of the verified file ``name``; ``KeyError`` if the bundle lacks it."""
        if name not in self.manifest.files:
            raise KeyError(f"bundle {self.version} has no file {name!r}")
        return self.path / name

    @property
    def files(self) -> dict[str, Path]:
        """``{name: path}`` of every verified file."""
        return {name: self.path / name for name in sorted(self.manifest.files)}


# -- reading (no lock) ------------------------------------------------------------------------


def list_versions(root: str | Path) -> list[str]:
    """Return the visible versions under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [
        e.name
        for e in os.scandir(root)
        if parse_version(e.name) is not None
        and e.is_dir(follow_symlinks=False)
        and os.path.isfile(os.path.join(e.path, MANIFEST))
    ]
    return sorted(names, key=version_key)


def current_version(root: str | Path) -> str | None:
    """Return the version ``CURRENT`` names, or ``None`` if there is no ``CURRENT`` yet.

    Raises ``IntegrityError`` naming ``CURRENT`` if it does not name a visible version (one
    :func:`list_versions` lists: a real directory, not a symlink, with a manifest).
    """
    path = Path(root) / CURRENT
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if parse_version(name) is None or name not in list_versions(root):
        raise IntegrityError(f"{path}: names {name!r}, which is not a published version")
    return name


def resolve_version(root: str | Path, name: str | None) -> str:
    """Return the full version name for ``name``: a full name, a sequence number, or ``None``.

    ``None`` means ``CURRENT``. Raises ``BundleError`` if there is no such visible version.
    """
    root = Path(root)
    if name is None:
        current = current_version(root)
        if current is None:
            raise VersionNotFound(f"{root}: no CURRENT version (nothing published or promoted)")
        return current
    versions = list_versions(root)
    if name.isascii() and name.isdigit():
        matches = [v for v in versions if version_key(v) == int(name)]
        if matches:
            return matches[0]
    elif name in versions:
        return name
    raise VersionNotFound(f"{root}: no published version {name!r}")


def verify_version(root: str | Path, version: str) -> tuple[Manifest, list[Problem]]:
    """Return the manifest of ``version`` and every file that does not match it.

    Raises ``IntegrityError`` if the manifest itself is missing, malformed, or names another
    version (a copied or renamed directory).
    """
    if parse_version(version) is None:
        raise BundleError(f"{version!r} is not a bundle version name")
    path = Path(root) / version
    manifest = read_manifest(path / MANIFEST)
    if manifest.version != version:
        raise IntegrityError(
            f"{path / MANIFEST}: manifest is for version {manifest.version}, not {version}"
        )
    return manifest, check_tree(path, manifest.files, exclude=(MANIFEST,))


def integrity_message(path: Path, problems: list[Problem]) -> str:
    """Return one message naming every problem file by its full path."""
    lines = [f"{path}: bundle failed verification ({len(problems)} problem(s))"]
    lines += [
        f"  {p.kind}: {path / p.name}" + (f" ({p.detail})" if p.detail else "") for p in problems
    ]
    return "\n".join(lines)


def open_bundle(root: str | Path, version: str | None = None) -> Bundle:
    """Return the verified bundle ``version`` (default: ``CURRENT``).

    Every listed file's size and sha256 are checked, and unlisted files refused, before this
    returns; ``IntegrityError`` names every missing, truncated, resized, altered or extra file.
    """
    root = Path(root)
    version = resolve_version(root, version)
    manifest, problems = verify_version(root, version)
    if problems:
        raise IntegrityError(integrity_message(root / version, problems))
    return Bundle(version=version, path=root / version, manifest=manifest)


# -- writing (under the store lock) ------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the store's exclusive lock; the kernel drops it if the process dies."""
    if not root.is_dir():
        raise BundleError(f"{root}: no bundles directory")
    fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _set_current(root: Path, version: str, action: str, old: str | None) -> None:
    tmp = root / (CURRENT + ".tmp")
    _write_durable(tmp, (version + "\n").encode())
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)
    # After the move: if we die in between, served_stack still ends with CURRENT (it appends
    # CURRENT when the history does not end with it).
    entry = {"at": utc_iso(dt.datetime.now(dt.UTC)), "action": action, "version": version}
    line = (json.dumps({**entry, "from": old}) + "\n").encode()
    with open(root / HISTORY, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line torn by a crash: do not glue ours onto it
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_history(root: str | Path) -> list[dict[str, Any]]:
    """Return the ``HISTORY`` entries, oldest first; unparsable lines are logged and skipped.

    A line torn by a crash during an append is the expected cause of a bad line.
    """
    path = Path(root) / HISTORY
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not (isinstance(entry, dict) and isinstance(entry.get("version"), str)):
            log.warning("%s:%d: skipping unparsable history line %r", path, number, line)
            continue
        out.append(entry)
    return out


def served_stack(root: str | Path) -> list[str]:
    """Return the versions served so far as a stack whose top is ``CURRENT``.

    Publish and promote push (after the ``from`` version, if an entry was lost and it is not
    on top); a rollback pops down to its target. Consecutive duplicates are dropped.
    """
    stack: list[str] = []
    for entry in read_history(root):
        version, before = entry["version"], entry.get("from")
        if entry.get("action") == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
        elif isinstance(before, str) and (not stack or stack[-1] != before):
            stack.append(before)
        if not stack or stack[-1] != version:
            stack.append(version)
    current = current_version(root)
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def rollback_candidates(root: str | Path) -> list[str]:
    """Return the versions served before ``CURRENT``, most recent first, without ``CURRENT``."""
    stack = served_stack(root)
    current = stack[-1] if stack else None
    out: list[str] = []
    for version in reversed(stack[:-1]):
        if version != current and version not in out:
            out.append(version)
    return out


def _remove_stale(root: Path) -> None:
    """Remove ``.tmp-*`` directories; only called under the lock, so none is in use."""
    for entry in os.scandir(root):
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir(follow_symlinks=False):
            log.info("removing stale %s", entry.path)
            shutil.rmtree(entry.path)


def _stage(staging: Path, source: Source) -> None:
    if callable(source):
        source(staging)
        return
    for name, src in source.items():
        dest = staging / check_name(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)


def _fill(staging: Path, source: Source) -> dict[str, FileDigest]:
    """Stage ``source`` into ``staging``; return the digests after fsyncing every file."""
    _stage(staging, source)
    if (staging / MANIFEST).exists():
        raise ValueError(f"{MANIFEST} is written by publish, not by the caller")
    digests = hash_tree(staging)
    for name in digests:
        check_name(name)
        _fsync_file(staging / name)
        os.chmod(staging / name, 0o444)
    # Deepest directories first, so each new entry is durable before its parent's.
    for d in sorted({(staging / n).parent for n in digests}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    return digests


def _jsonable(value: Mapping[str, Any] | Config | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Config):
        return value.to_dict()
    return dict(value)


def publish(
    root: str | Path,
    source: Source,
    *,
    config: Mapping[str, Any] | Config | None = None,
    metrics: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    parent: str | None = None,
    make_current: bool = True,
    store: StoreConfig | None = None,
) -> str:
    """Publish a new version atomically and return its name.

    ``source`` is ``{name: path or bytes}`` or a function that writes the files into the
    directory it is given; names are relative POSIX paths (subdirectories allowed). The new
    version becomes ``CURRENT`` if ``make_current``; then old versions are pruned.
    """
    root = Path(root)
    store = store or StoreConfig()
    info = {"config": _jsonable(config), "metrics": _jsonable(metrics), "gate": _jsonable(gate)}
    # Refuse values that are not strict JSON before copying anything.
    Manifest(version="", created="", files={}, parent=parent, **info).to_json()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        _remove_stale(root)
        staging = root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            digests = _fill(staging, source)
            now = dt.datetime.now(dt.UTC)
            existing = list_versions(root)
            version = format_version(version_key(existing[-1]) + 1 if existing else 1, now)
            manifest = Manifest(
                version=version, created=utc_iso(now), files=digests, parent=parent, **info
            )
            _write_durable(staging / MANIFEST, manifest.to_json())
            _fsync_dir(staging)
            os.rename(staging, root / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(root)
        log.info("published %s (%d files, %d bytes)", version, len(digests), manifest.total_bytes)
        if make_current:
            _set_current(root, version, "publish", current_version(root))
        _prune(root, store.keep)
    return version


def _prune(root: Path, keep: int) -> list[str]:
    versions = list_versions(root)
    protected = set(versions[-keep:])
    current = current_version(root)
    if current is not None:
        protected.add(current)
    visible = set(versions)
    target = next((v for v in rollback_candidates(root) if v in visible), None)
    if target is not None:
        protected.add(target)
    removed = [v for v in versions if v not in protected]
    for version in removed:
        doomed = root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        os.rename(root / version, doomed)
        shutil.rmtree(doomed)
        log.info("pruned %s", version)
    if removed:
        _fsync_dir(root)
    return removed


def prune(root: str | Path, store: StoreConfig | None = None) -> list[str]:
    """Delete versions beyond the newest ``store.keep``; never CURRENT or the rollback target."""
    root = Path(root)
    with _locked(root):
        return _prune(root, (store or StoreConfig()).keep)


def promote(root: str | Path, version: str) -> tuple[str | None, str]:
    """Verify ``version`` and make it ``CURRENT``; return ``(old current, new current)``.

    Raises ``IntegrityError`` (and leaves ``CURRENT`` alone) if the version does not verify.
    """
    root = Path(root)
    with _locked(root):
        version = resolve_version(root, version)
        open_bundle(root, version)
        old = current_version(root)
        _set_current(root, version, "promote", old)
    log.info("CURRENT %s -> %s", old, version)
    return old, version


def rollback(root: str | Path) -> tuple[str, str, list[str]]:
    """Move ``CURRENT`` back to the most recently served earlier version that verifies.

    Returns ``(old current, new current, skipped)`` where ``skipped`` says which earlier
    versions were passed over and why (pruned, or failed verification). Raises
    ``BundleError`` if there is no ``CURRENT`` or no earlier served version verifies.
    """
    root = Path(root)
    with _locked(root):
        old = resolve_version(root, None)
        visible = set(list_versions(root))
        skipped: list[str] = []
        for candidate in rollback_candidates(root):
            if candidate not in visible:
                skipped.append(f"{candidate}: no longer present")
                continue
            try:
                open_bundle(root, candidate)
            except IntegrityError as err:
                log.warning("rollback skips %s: %s", candidate, err)
                skipped.append(f"{candidate}: failed verification")
                continue
            _set_current(root, candidate, "rollback", old)
            log.info("rolled back CURRENT %s -> %s", old, candidate)
            return old, candidate, skipped
    raise BundleError(
        f"{root}: no earlier served version verifies; CURRENT stays {old}"
        + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        + "; use `slimrank bundle promote VERSION` to pick one"
    )
