"""The serving-time scorer: an ONNX ranker in an onnxruntime session, checked before loading."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

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
