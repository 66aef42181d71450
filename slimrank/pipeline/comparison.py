"""Quality under equal information: the served pipeline against its peers, paired over users.

Every system reads what :func:`~slimrank.evaluation.peers.observed_interactions` allows when it
scores the test part (training + validation interactions); every peer's hyperparameters are
chosen on validation (:func:`~slimrank.evaluation.peers.evaluate_peers`). Each comparison is
the mean per-user difference of test NDCG@k with a paired bootstrap 95% interval over the test
users (:func:`~slimrank.evaluation.paired.paired_bootstrap`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimrank.evaluation.paired import PairedInterval, PerUser, paired_bootstrap
from slimrank.evaluation.peers import (
    PEERS,
    Peer,
    PeerResult,
    evaluate_peers,
    format_params,
    peers_for,
)
from slimrank.pipeline.run import RunResult

# Pipeline variants compared, by report key: (label, what it is).
SERVED = "int8"
PIPELINE_ROWS = (
    ("int8", "pipeline, pruned int8 student (served)"),
    ("teacher", "pipeline, teacher fp32"),
    ("retrieval", "two-tower retrieval alone ({index}, {n} candidates)"),
)
MARGIN = 0.01  # issue 15: the served pipeline must beat the strongest peer by this much


@dataclasses.dataclass(frozen=True)
class Compared:
    """One system: how it was chosen, its NDCG@k on both parts, and served minus it on test."""

    name: str
    selected: str  # the hyperparameters validation chose ("-" when none)
    peer: bool  # a peer (not a part of the pipeline)
    valid_ndcg: float
    test_ndcg: float
    served_minus: PairedInterval | None  # None for the served ranker itself
    # A peer's training time (its test refit, CPU s); None for the pipeline's rows.
    fit_cpu_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every system's row, and the two comparisons the goals read."""

    k: int
    rows: tuple[Compared, ...]
    strongest_peer: str  # the peer with the highest test NDCG@k: the bar to clear
    skipped: tuple[str, ...] = ()  # peers not run, each with why (peers_for)
    # Each peer's full result (its test ranking too), by name; not part of to_dict().
    peer_results: Mapping[str, PeerResult] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def row(self, name: str) -> Compared:
        return next(r for r in self.rows if r.name == name)

    @property
    def served(self) -> Compared:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "strongest_peer": self.strongest_peer,
            "skipped": list(self.skipped),
            "rows": [
                {
                    **{f.name: getattr(r, f.name) for f in dataclasses.fields(r)},
                    "served_minus": r.served_minus.to_dict() if r.served_minus else None,
                }
                for r in self.rows
            ],
        }


def variant_per_user(
    result: RunResult, key: str, part: str = "test", ranker: Path | None = None
) -> PerUser:
    """Return NDCG@k per user on ``part`` (``"valid"`` or ``"test"``) of a pipeline variant
    (``int8``, ``teacher``, ``retrieval``), or of any other variant's ONNX ``ranker``."""
    from slimrank.compression.scorer import onnx_score_fn
    from slimrank.pipeline.artifacts import (
        CandidatesArtifact,
        DataArtifact,
        Int8Artifact,
        TeacherArtifact,
    )
    from slimrank.ranking.pipeline_eval import pipeline_per_user

    cands, feats, _ = CandidatesArtifact.load_one(result.path("candidates"), part)
    if key == "retrieval":
        scores = cands.retrieval_score
    elif key == "teacher":
        scores = TeacherArtifact.load_scores(result.path("teacher"))[part]
    elif ranker is not None:
        scores = onnx_score_fn(ranker)(feats)
    elif key == SERVED:
        scores = onnx_score_fn(Int8Artifact.load(result.path("int8")).ranker)(feats)
    else:
        raise ValueError(f"no per-user scores for variant {key!r}")
    truth = DataArtifact.load(result.path("data")).truth(part)
    return pipeline_per_user(cands, scores, truth, result.config.k)


def compare(
    result: RunResult,
    valid_ndcg: dict[str, float],
    peers: tuple[Peer, ...] = PEERS,
    resamples: int = 10_000,
) -> Comparison:
    """Return the served pipeline against the other variants and every peer, on test.

    ``valid_ndcg`` holds the pipeline variants' validation NDCG@k (from their steps).
    """
    from slimrank.pipeline.artifacts import INDEX, DataArtifact
    from slimrank.retrieval.index_io import describe_index

    k = result.config.k
    index = describe_index(result.path("index") / INDEX)  # the index the run built
    split = DataArtifact.load(result.path("data")).split
    per_user = {key: variant_per_user(result, key) for key, _ in PIPELINE_ROWS}
    served = per_user[SERVED]
    rows = []
    for key, label in PIPELINE_ROWS:
        label = label.format(n=result.config.candidates.n, index=index)
        other = None if key == SERVED else paired_bootstrap(served, per_user[key], resamples)
        rows.append(
            Compared(label, "-", key == "retrieval", valid_ndcg[key], per_user[key].mean, other)
        )
    peers, skipped = peers_for(split.n_items, peers)
    # The peers rank for the users the pipeline's test view ranks (a sample at scale, see
    # candidates.eval_users), so that every comparison is paired over the same users.
    found = evaluate_peers(split, k, peers, users=served.users)
    for res in found.values():
        rows.append(
            Compared(
                res.name,
                format_params(res.params),
                True,
                res.valid[f"ndcg@{k}"],
                res.test[f"ndcg@{k}"],
                paired_bootstrap(served, res.test_per_user, resamples),
                res.fit_cpu_seconds,
            )
        )
    strongest = max((r for r in rows if r.peer), key=lambda r: r.test_ndcg).name
    return Comparison(k, tuple(rows), strongest, skipped, found)


def comparison_goals(comparison: Comparison) -> tuple[tuple[str, bool, str], ...]:
    """Return issue 15's goal on ``comparison``: ``(goal, met, what was measured)``."""
    k = comparison.k
    best = comparison.row(comparison.strongest_peer)
    ci = best.served_minus
    assert ci is not None
    return (
        (
            f"served pipeline >= strongest peer ({best.name}) + {MARGIN} test NDCG@{k}, "
            "paired 95% interval above zero",
            ci.diff >= MARGIN and ci.above_zero,
            f"{comparison.served.test_ndcg:.4f} vs {best.test_ndcg:.4f}: {_interval(ci)}",
        ),
    )


def _interval(ci: PairedInterval) -> str:
    return f"{ci.diff:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"


def comparison_markdown(comparison: Comparison) -> list[str]:
    """Return the comparison's Markdown lines (a table and what it means)."""
    k = comparison.k
    head = [
        "system",
        "selected on validation",
        f"valid NDCG@{k}",
        f"test NDCG@{k}",
        f"served minus system, test NDCG@{k} [95% CI]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comparison.rows:
        diff = "-" if r.served_minus is None else _interval(r.served_minus)
        name = f"**{r.name}**" if r.served_minus is None else r.name
        lines.append(f"| {name} | {r.selected} | {r.valid_ndcg:.4f} | {r.test_ndcg:.4f} | {diff} |")
    n = comparison.served.served_minus or comparison.rows[1].served_minus
    users = n.users if n else 0
    lines += [
        "",
        "Equal information: when scoring the test part every system reads the training and "
        "validation interactions and nothing else (peers refitted on them with the setting "
        "validation chose; the pipeline's user vectors and feature tables are built from them). "
        f"Intervals: paired bootstrap over the {users} test users, percentile, "
        f"{n.resamples if n else 0} resamples. Strongest peer (highest test NDCG@{k}): "
        f"{comparison.strongest_peer}.",
    ]
    if comparison.skipped:
        lines[-1] += " Not computed: " + "; ".join(comparison.skipped) + "."
    return lines
