"""Snapshots whose ranker misbehaves after the warm-up call: held (for tests of admission
and shedding) or failing (for tests of how a ranker's error is answered)."""

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


def failing(snap: ModelSnapshot, message: str) -> ModelSnapshot:
    """A snapshot whose scorer passes the warm-up call, then raises ``RuntimeError(message)``."""
    calls = []

    def score(features: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError(message)
        return snap.score(features)

    return dataclasses.replace(snap, score=score)
