"""Side-by-side latency of rankers: the same candidates, one thread, interleaved repetitions."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved_latency(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 10
) -> dict[str, dict[str, float]]:
    """Return ``{name: {"p50": s, "p90": s}}`` of calling each function ``repeats`` times.

    The functions are called round-robin (one call of each per round), so a burst of load on
    the machine slows every variant alike instead of whichever happened to be running.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90))}
        for name, t in times.items()
    }
