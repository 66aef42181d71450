"""An overload front for ``slimrank serve``: nginx in front of the server, refusing model calls
past a set rate with RESOURCE_EXHAUSTED in C, before they reach the server's event loop."""
