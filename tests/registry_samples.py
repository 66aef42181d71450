"""Reading an in-process server's Prometheus registry in tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def sample_sum(
    registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0.0 when none):
    ``slimrank_shed_requests_total`` alone sums every ``reason``."""
    wanted = (labels or {}).items()
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )
