"""A snapshot whose ranker can be held, for tests of admission and shedding."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from slimrank.serving.snapshot import ModelSnapshot


def blocking(snap: ModelSnapshot) -> tuple[ModelSnapshot, threading.Semaphore, threading.Event]:
    """A snapshot whose scorer (after the warm-up call) signals ``entered``, then waits."""
    entered, release, warmed = threading.Semaphore(0), threading.Event(), threading.Event()

    def score(features: np.ndarray) -> np.ndarray:
        if warmed.is_set():
            entered.release()
            release.wait(10)
        warmed.set()
        return snap.score(features)

    return dataclasses.replace(snap, score=score), entered, release
