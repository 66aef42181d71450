"""The versioned model bundle: manifest, checksums, atomic publish, safe load.

``publish`` writes a new version atomically and moves ``CURRENT``; ``open_bundle`` verifies
every file before returning paths; ``formats`` holds the pickle-free readers and writers. See
``store`` for the on-disk layout and its invariants.
"""

from slimrank.bundle.store import (
    Bundle,
    BundleError,
    StoreConfig,
    current_version,
    list_versions,
    open_bundle,
    promote,
    publish,
    rollback,
)

__all__ = [
    "Bundle",
    "BundleError",
    "StoreConfig",
    "current_version",
    "list_versions",
    "open_bundle",
    "promote",
    "publish",
    "rollback",
]
