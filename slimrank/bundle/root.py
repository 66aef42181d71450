"""Where the bundle store is: one rule for every command that reads or writes it."""

from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "SLIMRANK_BUNDLES"
ROOT_HELP = f"bundles directory (default: ${ENV_ROOT}, else ./bundles)"


def bundles_root(given: str | Path | None) -> Path:
    """Return ``given``, else ``$SLIMRANK_BUNDLES``, else ``./bundles``."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get(ENV_ROOT) or "bundles")
