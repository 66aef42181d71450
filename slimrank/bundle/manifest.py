"""The bundle manifest: what a version holds and the digest of every file in it.

``manifest.json`` of format version 1::

    {
      "format_version": 1,
      "version": "v000012-20261122T143000Z",
      "created": "2026-11-22T14:30:00Z",
      "parent": "teacher-7" | null,        # version of the teacher the ranker was distilled from
      "config": {...},                     # the pipeline's config dicts
      "metrics": {...},                    # evaluation metrics
      "gate": {...},                       # the accuracy gate decision
      "files": {"ranker.onnx": {"size": 1234, "sha256": "..."}, ...}
    }

The manifest does not list itself. JSON is strict: NaN and infinities are refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimrank.bundle.checksums import FileDigest
from slimrank.bundle.versions import parse_version
from slimrank.errors import IntegrityError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HEX = frozenset("0123456789abcdef")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one bundle version."""

    version: str
    created: str
    files: Mapping[str, FileDigest]
    parent: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gate: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able dict written to ``manifest.json``."""
        return {
            "format_version": self.format_version,
            "version": self.version,
            "created": self.created,
            "parent": self.parent,
            "config": dict(self.config),
            "metrics": dict(self.metrics),
            "gate": dict(self.gate),
            "files": {name: self.files[name].to_dict() for name in sorted(self.files)},
        }

    def to_json(self) -> bytes:
        """Return the manifest as UTF-8 JSON; ``ValueError`` if a value is not strict JSON."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)
        return (text + "\n").encode()

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the listed files."""
        return sum(d.size for d in self.files.values())


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def manifest_from_dict(data: Any, source: str = "manifest") -> Manifest:
    """Return the ``Manifest`` of a parsed ``manifest.json``; ``IntegrityError`` if malformed."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{source}: malformed manifest: {why}")

    if not isinstance(data, dict):
        raise bad("top level is not an object")
    if data.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing = sorted({"version", "created", "files"} - set(data))
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    version, created, parent = data["version"], data["created"], data.get("parent")
    if not isinstance(version, str) or parse_version(version) is None:
        raise bad(f"version {version!r} is not a version name")
    if not isinstance(created, str):
        raise bad(f"created {created!r} is not a string")
    if parent is not None and not isinstance(parent, str):
        raise bad(f"parent {parent!r} is neither a string nor null")
    for key in ("config", "metrics", "gate", "files"):
        if not isinstance(data.get(key, {}), dict):
            raise bad(f"{key} is not an object")
    files: dict[str, FileDigest] = {}
    for name, entry in data["files"].items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and set(entry["sha256"]) <= _HEX
        )
        if not ok:
            raise bad(f"files[{name!r}] is not {{size: int, sha256: hex}}")
        try:
            check_name(name)
        except ValueError as err:
            raise bad(str(err)) from None
        files[name] = FileDigest(size=entry["size"], sha256=entry["sha256"])
    return Manifest(
        version=version,
        created=created,
        files=files,
        parent=parent,
        config=data.get("config", {}),
        metrics=data.get("metrics", {}),
        gate=data.get("gate", {}),
    )


def read_manifest(path: str | Path) -> Manifest:
    """Return the manifest at ``path``; ``IntegrityError`` naming it if missing or malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: manifest is missing") from None
    try:
        data = json.loads(raw.decode(), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise IntegrityError(f"{path}: malformed manifest: {err}") from None
    return manifest_from_dict(data, source=str(path))


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX file name inside a bundle.

    Raises ``ValueError`` for absolute names, ``..``, empty parts, backslashes, and the
    manifest's own name.
    """
    parts = name.split("/")
    ok = (
        bool(name)
        and "\\" not in name
        and "\0" not in name
        and not name.startswith("/")
        and all(p not in ("", ".", "..") for p in parts)
        and name != MANIFEST
    )
    if not ok:
        raise ValueError(f"bad bundle file name {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class ManifestDiff:
    """What changed between two manifests: files by name, and numeric metrics by dotted key."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    metrics: Mapping[str, tuple[float | None, float | None]]

    @property
    def same_files(self) -> bool:
        """True if both manifests list the same files with the same digests."""
        return not (self.added or self.removed or self.changed)


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Return the numeric leaves of a nested metrics dict keyed by dotted paths."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def diff_manifests(old: Manifest, new: Manifest) -> ManifestDiff:
    """Return the files added, removed or changed and the metrics that differ, old -> new."""
    a, b = old.files, new.files
    ma, mb = flat_metrics(old.metrics), flat_metrics(new.metrics)
    metrics = {
        k: (ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)
    }
    return ManifestDiff(
        added=tuple(sorted(set(b) - set(a))),
        removed=tuple(sorted(set(a) - set(b))),
        changed=tuple(sorted(n for n in set(a) & set(b) if a[n] != b[n])),
        metrics=metrics,
    )
