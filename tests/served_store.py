"""The real server over a bundle store, with a real client: the fixtures' shared shell."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from slimrank.serving.client import SlimrankClient
from slimrank.serving.config import ServerConfig
from slimrank.serving.reload import bundle_reload_fn, load_current
from slimrank.serving.server import create_server
from slimrank.serving.snapshot import SnapshotHolder


@contextlib.contextmanager
def serving(bundles: Path) -> Iterator[tuple[SnapshotHolder, int, SlimrankClient]]:
    """Serve the store's current bundle on port 0 (SERVING); yield its holder, port, client."""
    holder = SnapshotHolder(load_current(bundles))
    server, port = create_server(
        ServerConfig(), holder, CollectorRegistry(), bundle_reload_fn(bundles)
    )
    server.mark_serving()
    client = SlimrankClient(f"127.0.0.1:{port}", timeout=10.0)
    try:
        yield holder, port, client
    finally:
        client.close()
        server.shutdown(0).wait(5)
