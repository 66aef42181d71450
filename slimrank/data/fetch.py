"""Fetch MovieLens-100k in RecBole's atomic format from the pinned RecBole 1.2.1 wheel.

The wheel ships ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``: the exact files
RecBole's published numbers were computed on. We download the wheel with pip (never install
it), check its sha256, and extract the three files into the cache atomically: a temporary
directory beside the target, renamed into place, so a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from slimrank.bundle.checksums import sha256_file
from slimrank.errors import IntegrityError, SlimrankError

logger = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_DIR = "movielens-100k"
ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
_WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"


def data_home() -> Path:
    """Return ``$SLIMRANK_DATA`` or the user cache directory for slimrank."""
    env = os.environ.get("SLIMRANK_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("slimrank"))


def movielens_dir(home: Path | None = None) -> Path:
    """Return the directory holding the ml-100k atomic files (may not exist yet)."""
    return (home or data_home()) / ML100K_DIR


def is_fetched(home: Path | None = None) -> bool:
    """Return whether every ml-100k file is in the cache."""
    target = movielens_dir(home)
    return all((target / name).is_file() for name in ML100K_FILES)


def extract_movielens(
    wheel: Path, target: Path, expected_sha256: str = RECBOLE_WHEEL_SHA256
) -> None:
    """Check ``wheel``'s sha256, then place the ml-100k files at ``target`` atomically."""
    actual = sha256_file(wheel)
    if actual != expected_sha256:
        raise IntegrityError(
            f"{wheel.name}: sha256 {actual} != expected {expected_sha256}; nothing was written"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in ML100K_FILES:
                try:
                    member = zf.getinfo(_WHEEL_PREFIX + name)
                except KeyError as err:
                    raise IntegrityError(f"{wheel.name} has no {_WHEEL_PREFIX + name}") from err
                with zf.open(member) as src, (staging / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is plain user data
        if target.exists():
            # A partial directory from an older layout: replace it as a whole.
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def fetch_movielens_100k(home: Path | None = None) -> tuple[Path, bool]:
    """Return ``(directory, fetched_now)``; downloads only when the files are absent."""
    target = movielens_dir(home)
    if is_fetched(home):
        return target, False
    with tempfile.TemporaryDirectory(prefix="slimrank-fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            tmp,
            RECBOLE_REQUIREMENT,
        ]
        logger.info("downloading %s (for its ml-100k files; not installed)", RECBOLE_REQUIREMENT)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SlimrankError(
                f"pip download {RECBOLE_REQUIREMENT} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}"
            )
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if len(wheels) != 1:
            raise SlimrankError(f"expected one recbole wheel from pip, got {wheels}")
        extract_movielens(wheels[0], target)
    logger.info("ml-100k files written to %s", target)
    return target, True
