"""Prometheus config, recording and alert rules, and dashboard queries, checked by promtool.

promtool comes from the distribution's ``prometheus`` package: the tests install it when it is
missing and they run as root, fail when it is missing in CI (``CI=true``), and skip otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "slimrank.json"

# What the dashboard's variables stand for when its queries are run outside Grafana.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$job": "slimrank",
    "$instance": ".*",
}


def require_binary(name: str) -> str:
    """Return the path of a Prometheus binary, installing the package first if we can."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "install_prometheus.sh")], check=True, timeout=900)
        path = shutil.which(name)
        if path is None:
            pytest.fail(f"{name} still missing after scripts/install_prometheus.sh")
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{name} is missing in CI: run `sudo scripts/install_prometheus.sh` first")
    pytest.skip(
        f"{name} is not installed and we are not root: `sudo scripts/install_prometheus.sh`"
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_binary("promtool")


def run_promtool(promtool: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rules_by_kind(kind: str) -> dict[str, dict]:
    """Return every rule of kind ``alert`` or ``record`` by name, over all rule files."""
    out = {}
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    assert rule[kind] not in out, f"{rule[kind]} defined twice"
                    out[rule[kind]] = rule
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """Return (where, expr) for every panel target and annotation of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in board["panels"]
        for t in p["targets"]
    ]
    queries += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in board["annotations"]["list"]
        if "expr" in a
    ]
    return queries


def substitute(expr: str) -> str:
    for var, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return expr


# promtool


def test_prometheus_config_is_valid(promtool):
    result = run_promtool(promtool, "check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks the rule files it names: make sure it found all of them.
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_rule_files_are_valid(promtool):
    result = run_promtool(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(promtool, unit_test):
    result = run_promtool(promtool, "test", "rules", unit_test.name, cwd=unit_test.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_catch_an_alert_without_its_short_window(promtool, tmp_path):
    """Dropping the 5m window of the fast burn alert must fail the reset test."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROM, copy)
    alerts = copy / "rules" / "slimrank-alerts.yml"
    text = alerts.read_text()
    clause = "and job:slimrank_recommender_errors_per_requests:ratio_rate5m > (14.4 * 0.001)"
    assert text.count(clause) == 1
    alerts.write_text(text.replace(clause, ""))
    # Only the case that should catch it, to keep the run short.
    unit = load_yaml(copy / "tests" / "slo_alerts_test.yml")
    unit["tests"] = [g for g in unit["tests"] if "resets with its short window" in g["name"]]
    assert len(unit["tests"]) == 1
    (copy / "tests" / "reset_only_test.yml").write_text(yaml.safe_dump(unit))
    result = run_promtool(promtool, "test", "rules", "reset_only_test.yml", cwd=copy / "tests")
    assert result.returncode != 0
    assert "resets with its short window" in result.stdout + result.stderr


def test_dashboard_queries_parse(promtool, tmp_path):
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL.

    promtool has no PromQL parser command in this version, so each query becomes a recording
    rule and ``promtool check rules`` parses it.
    """
    queries = dashboard_queries()
    assert len(queries) >= 15
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_dashboard_query_is_caught(promtool, tmp_path):
    path = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": "sum by (method (rate(x[1m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [rule]}]}))
    assert run_promtool(promtool, "check", "rules", path).returncode != 0


# Coverage and consistency of the rule files (no promtool needed)


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    firing, quiet = set(), set()
    for path in UNIT_TESTS:
        for group in load_yaml(path)["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = set(rules_by_kind("alert"))
    assert alerts, "no alerts found"
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - alerts == set(), "unit tests name alerts that do not exist"


def test_unit_tests_load_every_rule_file():
    loaded = {
        (path.parent / rule_file).resolve()
        for path in UNIT_TESTS
        for rule_file in load_yaml(path)["rule_files"]
    }
    assert loaded == {p.resolve() for p in RULE_FILES}


def runbook_sections() -> dict[str, str]:
    """docs/runbook.md's sections by GitHub anchor (``### Slimrank Down`` -> slimrank-down)."""
    sections: dict[str, str] = {}
    anchor = None
    for line in (ROOT / "docs" / "runbook.md").read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchor = re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-")
            sections[anchor] = ""
        elif anchor is not None:
            sections[anchor] += line + "\n"
    return sections


def test_every_alert_says_how_bad_and_links_its_runbook_section():
    """Prometheus convention: a ``runbook_url`` annotation; ours point into docs/runbook.md,
    to a section that says what the alert means, what to check and what to do."""
    sections = runbook_sections()
    for name, rule in rules_by_kind("alert").items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        file, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert file == "docs/runbook.md" and anchor in sections, (name, anchor)
        text = sections[anchor]
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in text, (name, part)


def test_recording_rules_are_named_level_metric_operations():
    """``level:metric:operations``: the level is the labels the rule keeps (its ``by``), the
    metric part names a slimrank series, the operations say what was applied."""
    rules = rules_by_kind("record")
    assert rules
    for name, rule in rules.items():
        match = re.fullmatch(r"([a-z_]+):(slimrank_[a-z_]+):([a-z0-9_]+)", name)
        assert match, name
        level, _, operations = match.groups()
        kept = set()
        for group in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            kept |= {label.strip() for label in group.split(",")} - {"le"}
        assert set(level.split("_")) == kept, (name, kept)
        ranges = set(re.findall(r"\[(\w+)\]", rule["expr"]))
        assert len(ranges) == 1 and operations.endswith(f"rate{ranges.pop()}"), name


ERROR_SLI = "job:slimrank_recommender_errors_per_requests:ratio_rate"  # + window
SLOW_SLI = "job:slimrank_recommender_slow_per_requests:ratio_rate"


def _sli_rules(prefix: str) -> dict[str, str]:
    rules = rules_by_kind("record")
    return {
        name.removeprefix(prefix): " ".join(rule["expr"].split())
        for name, rule in rules.items()
        if name.startswith(prefix)
    }


@pytest.mark.parametrize("sli", [ERROR_SLI, SLOW_SLI])
def test_each_sli_is_the_same_query_over_every_window(sli):
    windows = _sli_rules(sli)
    assert set(windows) == {"5m", "30m", "1h", "6h"}
    for window, expr in windows.items():
        ranges = set(re.findall(r"\[([^\]]+)\]", expr))
        assert ranges == {window}, (window, ranges)
        assert expr.replace(f"[{window}]", "[W]") == windows["5m"].replace("[5m]", "[W]")


def test_burn_rate_alerts_pair_each_long_window_with_its_twelfth():
    """Google SRE workbook pairs: 14.4x over 1h and 5m, 6x over 6h and 30m."""
    pairs = {"14.4": ("1h", "5m"), "6": ("6h", "30m")}
    budgets = {"errors": "0.001", "slow": "0.01"}
    seen = set()
    term = r"job:slimrank_recommender_(\w+)_per_requests:ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\)"
    for name, rule in rules_by_kind("alert").items():
        terms = re.findall(term, rule["expr"])
        if not terms:
            continue
        (sli, long_w, factor, budget), (sli2, short_w, factor2, budget2) = terms
        assert sli == sli2 and factor == factor2 and budget == budget2 == budgets[sli], name
        assert (long_w, short_w) == pairs[factor], name
        assert " and " in rule["expr"], name
        seen.add((sli, factor))
    assert seen == {(s, f) for s in budgets for f in pairs}


def test_dashboard_error_ratio_uses_the_alerting_sli():
    codes = re.search(r'code=~"([^"]+)"', _sli_rules(ERROR_SLI)["5m"]).group(1)
    (error_panel,) = [expr for where, expr in dashboard_queries() if "Error ratio" in where]
    assert f'code=~"{codes}"' in error_panel
    # The latency panel and the latency SLI read the same bucket.
    assert 'le="0.025"' in _sli_rules(SLOW_SLI)["5m"]
    assert any('le="0.025"' in expr for _, expr in dashboard_queries())
