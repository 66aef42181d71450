"""File and directory-tree digests (size + sha256) and checking a tree against them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

# Kinds of problem that ``check_tree`` reports, in the order they are listed.
MISSING = "missing"
TRUNCATED = "truncated"  # smaller than recorded
RESIZED = "resized"  # larger than recorded
ALTERED = "altered"  # right size, wrong sha256
UNEXPECTED = "unexpected"  # on disk but not recorded
NOT_A_FILE = "not a regular file"


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """Size in bytes and hex sha256 of one file."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, int | str]:
        """Return ``{"size": ..., "sha256": ...}``."""
        return {"size": self.size, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One file that does not match its recorded digest; ``name`` is relative to the tree."""

    name: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}" + (f" ({self.detail})" if self.detail else "")


# Files are hashed in chunks this large. Reading and hashing each chunk release the GIL, and
# taking it back between chunks is the only Python work: with ``hashlib.file_digest``'s 256
# KiB, a 2.3 GiB bundle takes the GIL back ~9,000 times (~300 times in 8 MiB chunks), each a
# chance for the loading thread to retake it before a waiting event loop does. (The ~28 ms
# loop stalls seen while a reload hashed showed up too when another process hashed: those
# are the machine's, not this.)
DIGEST_CHUNK_BYTES = 8 << 20


def digest_file(path: str | Path, chunk_bytes: int = DIGEST_CHUNK_BYTES) -> FileDigest:
    """Return the size and sha256 of the file at ``path``, read in ``chunk_bytes`` chunks."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        sha = hashlib.sha256()
        view = memoryview(bytearray(max(1, min(chunk_bytes, size))))
        while got := f.readinto(view):
            sha.update(view[:got])
    return FileDigest(size=size, sha256=sha.hexdigest())


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of the file at ``path``."""
    return digest_file(path).sha256


def tree_files(root: str | Path) -> list[str]:
    """Return the relative POSIX names of every entry below ``root`` that is not a directory.

    Symlinks and special files are listed too (not followed), so that a checker can refuse
    them; names are sorted.
    """
    root = Path(root)
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        # os.walk lists symlinks to directories among dirnames; report them as entries.
        names.extend((rel / d).as_posix() for d in dirnames if (Path(dirpath) / d).is_symlink())
        names.extend((rel / f).as_posix() for f in filenames)
    return sorted(names)


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def hash_tree(root: str | Path, exclude: Iterable[str] = ()) -> dict[str, FileDigest]:
    """Return ``{relative name: digest}`` for every regular file below ``root``.

    Names in ``exclude`` (relative POSIX names) are skipped. Raises ``ValueError`` on a
    symlink or special file, which a bundle may not contain.
    """
    root = Path(root)
    skip = set(exclude)
    out: dict[str, FileDigest] = {}
    for name in tree_files(root):
        if name in skip:
            continue
        if not _is_regular(root / name):
            raise ValueError(f"{root / name}: not a regular file (symlinks are not allowed)")
        out[name] = digest_file(root / name)
    return out


def tree_digest(digests: Mapping[str, FileDigest]) -> str:
    """Return one sha256 over a ``hash_tree`` result: equal iff names, sizes and hashes are."""
    h = hashlib.sha256()
    for name in sorted(digests):
        d = digests[name]
        h.update(f"{name}\0{d.size}\0{d.sha256}\n".encode())
    return h.hexdigest()


def check_tree(
    root: str | Path, expected: Mapping[str, FileDigest], exclude: Iterable[str] = ()
) -> list[Problem]:
    """Return every file below ``root`` that is missing, truncated, resized, altered or extra.

    Sizes are compared before hashing, so a truncated file is reported without reading it.
    Names in ``exclude`` are neither expected nor reported as extra. An empty list means the
    tree matches ``expected`` exactly.
    """
    root = Path(root)
    skip = set(exclude)
    problems: list[Problem] = []
    for name in sorted(expected):
        want = expected[name]
        path = root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(Problem(name, MISSING))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(Problem(name, NOT_A_FILE))
            continue
        if st.st_size != want.size:
            kind = TRUNCATED if st.st_size < want.size else RESIZED
            problems.append(Problem(name, kind, f"{st.st_size} bytes, expected {want.size}"))
            continue
        got = digest_file(path)
        if got.sha256 != want.sha256:
            problems.append(Problem(name, ALTERED, "sha256 differs"))
    for name in tree_files(root):
        if name not in expected and name not in skip:
            problems.append(Problem(name, UNEXPECTED, "not in the manifest"))
    return problems
