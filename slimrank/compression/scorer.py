"""The serving-time scorer: an ONNX ranker in an onnxruntime session, checked before loading."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from slimrank.config import Config, require
from slimrank.errors import IntegrityError


@dataclasses.dataclass(frozen=True)
class ScorerConfig(Config):
    """Threads of the onnxruntime session (one each keeps requests from fighting for cores)."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            v = getattr(self, name)
            require(v >= 0, self, name, v, "must be >= 0 (0 lets onnxruntime choose)")


class Scorer:
    """Scores ``(M, F)`` float32 candidates to ``(M,)`` with an ONNX ranker.

    The file is read once, its sha256 compared with ``expected_sha256``, and the same bytes
    handed to onnxruntime, so what is checked is what runs.
    """

    def __init__(
        self, path: str | Path, expected_sha256: str, config: ScorerConfig | None = None
    ) -> None:
        self.path = Path(path)
        self.config = config or ScorerConfig()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError as e:
            raise IntegrityError(f"{self.path}: ranker file is missing") from e
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise IntegrityError(
                f"{self.path}: sha256 {actual} does not match expected {expected_sha256}"
            )
        self.sha256 = actual
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        dim = inp.shape[1] if len(inp.shape) == 2 else None
        if not isinstance(dim, int):
            raise IntegrityError(f"{self.path}: input {inp.name} is {inp.shape}, expected (M, F)")
        self.input_dim = dim

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return one float32 score per row of ``features`` ``(M, F)``."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"features must be (M, {self.input_dim}), got {features.shape}")
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        (scores,) = self.session.run(None, {self.input_name: features})
        return scores.reshape(-1)  # (M,)


def score_lists(scorer: Scorer, values: np.ndarray) -> np.ndarray:
    """Return ``(U, N)`` scores of ``(U, N, F)`` lists, one scorer call per list.

    One list per call is what a server does with one request; dynamic int8 quantizes
    activations with one range per call, so scoring all lists at once would not be.
    """
    if len(values) == 0:
        return np.zeros(values.shape[:2], dtype=np.float32)
    return np.stack([scorer.score(x) for x in values])  # (U, N)


def onnx_scorer(path: Path) -> Scorer:
    """Return a one-thread :class:`Scorer` of an ONNX ranker this process wrote (its sha256
    is computed here, not checked against a manifest)."""
    from slimrank.bundle.checksums import sha256_file

    return Scorer(path, sha256_file(path), ScorerConfig(intra_op_threads=1))


def onnx_score_fn(path: Path) -> Callable[[Any], np.ndarray]:
    """Return ``score(feats) -> (U, N)`` running the ONNX ranker at ``path`` on
    :class:`~slimrank.ranking.features.CandidateFeatures`-like ``feats`` (its ``values``)."""
    scorer = onnx_scorer(path)

    def score(feats: Any) -> np.ndarray:
        return score_lists(scorer, feats.values)

    return score


def bench_scorer(path: Path, features: np.ndarray, repeats: int, warmup: int = 5) -> float:
    """Return the median seconds of scoring ``(M, F)`` ``features`` with the ONNX file, 1 thread."""
    import time

    scorer = onnx_scorer(path)
    x = np.ascontiguousarray(features, dtype=np.float32)
    for _ in range(warmup):
        scorer.score(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
