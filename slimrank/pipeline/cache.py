"""Content-addressed step outputs: an interrupted pipeline resumes where it stopped.

Each step's output directory is named by a digest of the step name, its config, the
digests of the steps it reads and the sha256 of every file it reads from outside the cache
(:mod:`slimrank.pipeline.inputs`): a log rewritten in place re-runs the step.

A step runs in a hidden temporary directory that is renamed into place only when the step
returns, so a killed step leaves nothing that looks finished;
its leftovers are removed by the next run. While a step runs, its process holds an ``flock``
on a lock file beside the temporary directory; the kernel drops it when the process dies, so
cleanup removes only the leftovers of dead runs, never a step another live run is writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimrank.pipeline.inputs import InputFile

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def step_digest(
    name: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    files: Sequence[InputFile] = (),
) -> str:
    """Return the hex sha256 of a step's name, JSON config, upstream digests and input files."""
    key: dict[str, Any] = {"step": name, "config": config, "inputs": dict(sorted(inputs.items()))}
    if files:
        key["files"] = {f.path: f.sha256 for f in files}
    payload = json.dumps(
        key,
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class StepOutput:
    """A finished step: its directory and the digest that names it."""

    name: str
    digest: str
    path: Path
    cached: bool


class StepCache:
    """Finished step outputs under ``root/<step>-<digest[:16]>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, name: str, digest: str) -> Path:
        """Return where the output of ``name`` with ``digest`` lives once finished."""
        return self.root / f"{name}-{digest[:16]}"

    def run(
        self,
        name: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        fn: Callable[[Path], None],
        files: Sequence[InputFile] = (),
    ) -> StepOutput:
        """Return the cached output of the step, or run ``fn(tmp_dir)`` and publish it.

        ``files`` are the content keys of the files the step reads from outside the cache.
        """
        digest = step_digest(name, config, inputs, files)
        final = self.path_for(name, digest)
        cached = final.is_dir()
        for f in files:
            if f.changed:
                then = "its output for this content is cached" if cached else "re-running"
                log.info("step %s: input %s changed, %s", name, f.path, then)
        if cached:
            log.info("step %s: cached (%s)", name, final.name)
            return StepOutput(name, digest, final, cached=True)
        tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        lock = _lock_path(tmp)
        record = {"config": config, "inputs": inputs, "files": {f.path: f.sha256 for f in files}}
        with open(lock, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when this process ends, however
            try:
                tmp.mkdir()
                return self._run_in(name, digest, record, fn, tmp, final)
            finally:
                lock.unlink(missing_ok=True)

    def _run_in(
        self,
        name: str,
        digest: str,
        record: Mapping[str, Any],
        fn: Callable[[Path], None],
        tmp: Path,
        final: Path,
    ) -> StepOutput:
        """Run ``fn`` into ``tmp`` and rename it to ``final``; remove ``tmp`` on failure."""
        try:
            fn(tmp)
            (tmp / "step.json").write_text(
                json.dumps(
                    {"step": name, "digest": digest, **record},
                    indent=2,
                    sort_keys=True,
                    default=str,
                )
            )
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StepOutput(name, digest, final, cached=False)

    def clean_partial(self) -> list[Path]:
        """Remove temporary directories left by dead runs; return what was removed.

        A directory whose lock another live process holds is a step in progress: it is kept.
        """
        removed = []
        for tmp in sorted(p for p in self.root.glob(f"{_TMP_PREFIX}*") if p.is_dir()):
            lock = _lock_path(tmp)
            with open(lock, "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run is writing this step
                if tmp.is_dir():  # not renamed into place by a run that just finished
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
                lock.unlink(missing_ok=True)
        for lock in self.root.glob(f"{_TMP_PREFIX}*.lock"):
            with open(lock, "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if not lock.with_suffix("").exists():  # a run died before making its dir
                    lock.unlink(missing_ok=True)
        if removed:
            log.info("removed %d partial step output(s) from an interrupted run", len(removed))
        return removed


def _lock_path(tmp: Path) -> Path:
    """Return the lock file that marks ``tmp`` as in use (beside it, so it is never renamed)."""
    return tmp.with_name(tmp.name + ".lock")
