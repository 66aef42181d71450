"""Content-addressed step outputs: an interrupted pipeline resumes where it stopped.

Each step's output directory is named by a digest of the step name, its config and the
digests of the steps it reads. A step runs in a hidden temporary directory that is renamed
into place only when the step returns, so a killed step leaves nothing that looks finished;
its leftovers are removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def step_digest(name: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Return the hex sha256 of a step's name, JSON config and upstream digests."""
    payload = json.dumps(
        {"step": name, "config": config, "inputs": dict(sorted(inputs.items()))},
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
    ) -> StepOutput:
        """Return the cached output of the step, or run ``fn(tmp_dir)`` and publish it."""
        digest = step_digest(name, config, inputs)
        final = self.path_for(name, digest)
        if final.is_dir():
            log.info("step %s: cached (%s)", name, final.name)
            return StepOutput(name, digest, final, cached=True)
        tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            fn(tmp)
            (tmp / "step.json").write_text(
                json.dumps(
                    {"step": name, "digest": digest, "config": config, "inputs": inputs},
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
        """Remove temporary directories left by killed runs; return what was removed."""
        removed = []
        for tmp in sorted(self.root.glob(f"{_TMP_PREFIX}*")):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        if removed:
            log.info("removed %d partial step output(s) from an interrupted run", len(removed))
        return removed
