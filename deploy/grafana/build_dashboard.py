"""Build the slimrank Grafana dashboard JSON from the panel spec below.

    python deploy/grafana/build_dashboard.py           # rewrite dashboards/slimrank.json
    python deploy/grafana/build_dashboard.py --check   # exit 1 if the file is out of date

The spec is the source of truth; the JSON is committed so that Grafana's file provider can
mount it as is. Queries use the dashboard variables ``$job`` and ``$instance`` and Grafana's
``$__rate_interval``; tests/test_prometheus_rules.py parses every query with promtool and
tests/test_prometheus_scrape.py runs them against a real Prometheus.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "slimrank.json"
DASHBOARD_UID = "slimrank-serving"
DATASOURCE_UID = "slimrank-prometheus"  # provisioning/datasources/prometheus.yml sets this uid
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

SEL = 'job=~"$job", instance=~"$instance"'
RECOMMENDER = 'method=~"/slimrank.v1.Recommender/.+"'
# Must match the availability SLI in deploy/prometheus/rules/slimrank-recording.yml.
BAD_CODES = (
    "UNKNOWN|INTERNAL|DATA_LOSS|UNIMPLEMENTED|UNAVAILABLE|RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED"
)
RATE = "$__rate_interval"
# The optional front's scrape job in deploy/prometheus/prometheus.yml (not a $job choice: the
# front's calls are counted on its own metrics port, beside the servers' jobs).
FRONT_JOB = "slimrank-front"


def _rate(metric: str, *matchers: str, fn: str = "rate") -> str:
    """Return ``fn(metric{$job, $instance, matchers...}[$__rate_interval])``."""
    return f"{fn}({metric}{{{', '.join((SEL, *matchers))}}}[{RATE}])"


@dataclasses.dataclass(frozen=True)
class Target:
    """One query of a panel; ``legend`` is a Grafana legend format such as ``{{method}}``."""

    expr: str
    legend: str


@dataclasses.dataclass(frozen=True)
class Panel:
    """A time-series panel; ``width`` is in Grafana's 24-column grid."""

    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    width: int = 12
    height: int = 8
    stack: bool = False
    thresholds: tuple[float, ...] = ()  # drawn as dashed lines (SLO limits)


def _quantiles(metric: str, by: str) -> tuple[Target, ...]:
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({by}, le) ({_rate(metric + '_bucket')}))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    )


PANELS: tuple[Panel, ...] = (
    Panel(
        "Calls per second by method and code",
        "gRPC calls finished per second, by full method name and status code.",
        "reqps",
        (
            Target(
                f"sum by (method, code) (rate(slimrank_grpc_requests_total{{{SEL}}}[{RATE}]))",
                "{{method}} {{code}}",
            ),
        ),
        stack=True,
    ),
    Panel(
        "Error ratio",
        "Fraction of Recommender calls that ended in a server-side code "
        f"({BAD_CODES.replace('|', ', ')}); the availability objective allows 0.1%. "
        "Client mistakes such as INVALID_ARGUMENT do not count.",
        "percentunit",
        (
            Target(
                f"(sum(rate(slimrank_grpc_requests_total{{{SEL}, {RECOMMENDER}, "
                f'code=~"{BAD_CODES}"}}[{RATE}]))'
                f" or 0 * sum(rate(slimrank_grpc_requests_total{{{SEL}, {RECOMMENDER}}}[{RATE}])))"
                f" / sum(rate(slimrank_grpc_requests_total{{{SEL}, {RECOMMENDER}}}[{RATE}]))",
                "error ratio",
            ),
        ),
        thresholds=(0.001,),
    ),
    Panel(
        "Latency p50 / p95 / p99 by method",
        "Call duration quantiles from the server's duration histogram.",
        "s",
        _quantiles("slimrank_grpc_request_duration_seconds", "method"),
        width=24,
        thresholds=(0.025,),
    ),
    Panel(
        "Calls slower than 25 ms",
        "Fraction of Recommender calls slower than 25 ms (the le=0.025 bucket); the latency "
        "objective allows 1%.",
        "percentunit",
        (
            Target(
                "1 - sum("
                + _rate("slimrank_grpc_request_duration_seconds_bucket", RECOMMENDER, 'le="0.025"')
                + ") / sum("
                + _rate("slimrank_grpc_request_duration_seconds_count", RECOMMENDER)
                + ")",
                "slower than 25 ms",
            ),
        ),
        thresholds=(0.01,),
    ),
    Panel(
        "Latency by stage",
        "p50 and p99 of each stage of a Recommend call: queue wait, retrieve (FAISS), "
        "features, rank (int8 ranker).",
        "s",
        tuple(
            Target(
                f"histogram_quantile({q}, sum by (stage, le) "
                f"(rate(slimrank_stage_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
                f"p{round(q * 100)} {{{{stage}}}}",
            )
            for q in (0.5, 0.99)
        ),
    ),
    Panel(
        "In-flight and shed calls",
        "Calls being served now, and calls shed per second by reason: refused with "
        "RESOURCE_EXHAUSTED on arrival because the calls ahead would have kept them waiting "
        "too long (wait), --max-inflight model calls were in progress (in_progress), or every "
        "slot was taken (total).",
        "short",
        (
            Target(
                f"sum by (instance) (slimrank_inflight_requests{{{SEL}}})", "in flight {{instance}}"
            ),
            Target(
                f"sum by (instance, reason) (rate(slimrank_shed_requests_total{{{SEL}}}[{RATE}]))",
                "shed/s {{instance}} {{reason}}",
            ),
        ),
    ),
    Panel(
        "Front: calls by outcome",
        "Recommender calls through the optional `slimrank front`, per second by outcome: "
        "forwarded (answered by a server), refused by the front's limit at once or after "
        "waiting in its queue (queue_timeout), refused by a server after the front let them "
        "through (server_refused), failed between the front and the servers (upstream_error), "
        "or other. The front's refusals never reach the servers' panels. Empty without a front.",
        "reqps",
        (
            Target(
                "sum by (instance, outcome) "
                f'(rate(slimrank_front_calls_total{{job="{FRONT_JOB}"}}[{RATE}]))',
                "{{instance}} {{outcome}}",
            ),
        ),
        stack=True,
    ),
    Panel(
        "Served model",
        "The bundle version each instance serves (1 while served), and model reloads and "
        "reload failures in each interval. A failed reload keeps the previous model.",
        "short",
        (
            Target(
                f"max by (instance, version) (slimrank_model_info{{{SEL}}})",
                "{{instance}} {{version}}",
            ),
            Target(
                f"sum by (instance) (increase(slimrank_model_reloads_total{{{SEL}}}[{RATE}]))",
                "reloads {{instance}}",
            ),
            Target(
                "sum by (instance) ("
                + _rate("slimrank_model_reload_failures_total", fn="increase")
                + ")",
                "reload failures {{instance}}",
            ),
        ),
    ),
    Panel(
        "Index items",
        "Items in the served FAISS index.",
        "short",
        (Target(f"max by (instance) (slimrank_index_items{{{SEL}}})", "{{instance}}"),),
        width=6,
    ),
    Panel(
        "Candidates per call",
        "Retrieval candidates left per call after exclusions: mean and p99.",
        "short",
        (
            Target(
                f"sum(rate(slimrank_candidates_per_request_sum{{{SEL}}}[{RATE}]))"
                f" / sum(rate(slimrank_candidates_per_request_count{{{SEL}}}[{RATE}]))",
                "mean",
            ),
            Target(
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(slimrank_candidates_per_request_bucket{{{SEL}}}[{RATE}])))",
                "p99",
            ),
        ),
        width=6,
    ),
    Panel(
        "Process CPU",
        "CPU seconds used per second by each server process (1 = one core busy).",
        "short",
        (Target(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}"),),
        width=6,
    ),
    Panel(
        "Process memory",
        "Resident memory of each server process.",
        "bytes",
        (Target(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}"),),
        width=6,
    ),
)

# Reload events drawn on every time-series panel; `changes` is > 0 in a step with a reload.
ANNOTATIONS = (
    {
        "name": "Model reloads",
        "expr": f"changes(slimrank_model_reloads_total{{{SEL}}}[1m]) > 0",
        "iconColor": "blue",
        "titleFormat": "model reload",
        "textFormat": "{{instance}}",
    },
    {
        "name": "Model reload failures",
        "expr": f"changes(slimrank_model_reload_failures_total{{{SEL}}}[1m]) > 0",
        "iconColor": "red",
        "titleFormat": "model reload failed",
        "textFormat": "{{instance}}",
    },
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    steps = [{"color": "green", "value": None}]
    steps += [{"color": "red", "value": t} for t in panel.thresholds]
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "min": 0,
                "custom": {
                    "drawStyle": "line",
                    "fillOpacity": 10,
                    "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
                    "thresholdsStyle": {"mode": "dashed" if panel.thresholds else "off"},
                },
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend,
                "range": True,
            }
            for i, t in enumerate(panel.targets)
        ],
    }


def _variable(name: str, label: str, query: str, *, include_all: bool, default: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time-range change
        "includeAll": include_all,
        "allValue": ".*" if include_all else None,
        "multi": include_all,
        "sort": 1,
        "current": {"text": default, "value": default},
        "options": [],
    }


def build() -> dict:
    """Return the dashboard as a JSON-able dict; panels flow left to right, 24 columns a row."""
    panels, x, y, row_height = [], 0, 0, 0
    for i, panel in enumerate(PANELS, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, i, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": DASHBOARD_UID,
        "title": "slimrank serving",
        "description": "Calls, errors, latency (per method and stage), load shedding, served "
        "model and process resources of slimrank gRPC servers.",
        "tags": ["slimrank"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                *(
                    {
                        "datasource": DATASOURCE,
                        "enable": True,
                        "hide": False,
                        "step": "1m",
                        **a,
                    }
                    for a in ANNOTATIONS
                ),
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": DATASOURCE_UID},
                    "options": [],
                    "refresh": 1,
                },
                _variable(
                    "job",
                    "Job",
                    "label_values(slimrank_grpc_requests_total, job)",
                    include_all=False,
                    default="slimrank",
                ),
                _variable(
                    "instance",
                    "Instance",
                    'label_values(slimrank_inflight_requests{job=~"$job"}, instance)',
                    include_all=True,
                    default="$__all",
                ),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    """Return the dashboard JSON text exactly as committed."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(args.out), "generated", lineterm=""
            )
            sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
            sys.stderr.write(f"{args.out} is out of date: run {sys.argv[0]}\n")
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
