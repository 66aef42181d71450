"""EASE's weights and RecBole's published numbers on ml-100k.

The anchors check the protocol (RecBole's EASE reaches test NDCG@10 0.330), on RecBole's own
random split, which is not ours. How the peers are fitted and evaluated under equal
information is :mod:`slimrank.evaluation.peers`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from slimrank.config import Config, require

# RecBole 1.2.1 on ml-100k, RS 80/10/10 by user, full ranking: test Recall/NDCG/MRR/Hit@10.
RECBOLE_ANCHORS: dict[str, dict[str, float]] = {
    "BPR": {"recall@10": 0.247, "ndcg@10": 0.293, "mrr@10": 0.490, "hit@10": 0.782},
    "LightGCN": {"recall@10": 0.258, "ndcg@10": 0.305, "mrr@10": 0.503, "hit@10": 0.805},
    "EASE": {"recall@10": 0.281, "ndcg@10": 0.330, "mrr@10": 0.528, "hit@10": 0.820},
}


@dataclasses.dataclass(frozen=True)
class EaseConfig(Config):
    """EASE's L2 weight on the item-item matrix (RecBole's ``reg_weight``, default 250)."""

    l2: float = 250.0

    def __post_init__(self) -> None:
        require(self.l2 > 0, self, "l2", self.l2, "must be positive")


def ease_weights(train: sp.csr_matrix, config: EaseConfig) -> np.ndarray:
    """Return EASE's float32 ``(I, I)`` item-item matrix B (zero diagonal) for binary ``train``.

    B = I - P diag(1 / diag(P)) with P = (X^T X + l2 I)^-1 (Steck, 2019).
    """
    x = sp.csr_matrix(train, dtype=np.float64)
    return ease_from_gram((x.T @ x).toarray(), config.l2).astype(np.float32)


def ease_from_gram(gram: np.ndarray, l2: float) -> np.ndarray:
    """Return EASE's ``(I, I)`` B (zero diagonal) solved on an item-item ``gram`` (float64,
    changed in place: ``l2`` is added to its diagonal): B = I - P diag(1 / diag(P)) with
    P = (gram + l2 I)^-1."""
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b
