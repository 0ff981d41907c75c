"""The dashboard, the alert rules and the README against pipeline/metrics.py: every metric shown and documented,
no name that the code does not export, a readable layout, alerts with a duration, severity and runbook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import pipeline.metrics  # noqa: F401 - registers the metrics
from benchmarks.dashboard import ALERTS, DASHBOARD, alert_rules, dashboard_panels, with_bool_comparisons

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_info", "_created")


def exported() -> dict[str, str]:
    """Family name -> type of every vectorstream metric."""
    return {m.name: m.type for m in REGISTRY.collect() if m.name.startswith("vectorstream_")}


def family(sample: str) -> str:
    for suffix in SUFFIXES:
        if sample.endswith(suffix) and sample[: -len(suffix)] in exported():
            return sample[: -len(suffix)]
    return sample


def names_in(expr: str) -> set[str]:
    return {family(n) for n in re.findall(r"\bvectorstream_\w+", expr)}


def all_exprs() -> list[str]:
    return [t.expr for p in dashboard_panels() for t in p.targets] + [r.expr for r in alert_rules()]


def test_every_metric_is_on_the_dashboard_and_in_the_readme() -> None:
    shown = set().union(*(names_in(t.expr) for p in dashboard_panels() for t in p.targets))
    assert set(exported()) - shown == set()
    section = README.split("## Observability and the production stack", 1)[1].split("\n## ", 1)[0]
    documented = {family(n) for n in re.findall(r"`(vectorstream_\w+)`", section)}
    assert set(exported()) - documented == set()


def test_no_expression_names_a_metric_the_code_does_not_export() -> None:
    unknown = {n for e in all_exprs() for n in names_in(e)} - set(exported())
    assert not unknown


def test_counters_are_rated_and_histograms_are_read_by_bucket() -> None:
    types = exported()
    for expr in all_exprs():
        for name in re.findall(r"\bvectorstream_\w+", expr):
            kind = types.get(family(name))
            if kind == "counter":
                assert name.endswith("_total") and (
                    re.search(rf"(rate|increase)\({name}\b", expr) or re.search(rf"{name}\s*>\s*0", expr)
                ), f"{name} in {expr}: a counter's raw value means nothing"
            if kind == "histogram":
                assert name.endswith(("_bucket", "_count", "_sum")), f"{name} in {expr}"


def test_layout_fits_the_grid_without_overlaps() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    assert doc["uid"] == "vectorstream" and doc["templating"]["list"][0]["name"] == "instance"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r.name)
def test_alert_rules_have_a_duration_a_severity_and_a_runbook(rule) -> None:
    import yaml

    raw = next(r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if r["alert"] == rule.name)
    assert rule.for_ != "0s" and rule.severity in {"warning", "critical"}
    assert {"summary", "description", "runbook"} <= set(raw["annotations"])
    assert " bool " in with_bool_comparisons(rule.expr)


def test_bool_comparisons_leave_matchers_ranges_and_strings_alone() -> None:
    expr = 'sum(rate(x_total{code!="a>b", le=~"1|2"}[5m])) > 0.5 and y <= bool 3 and z == 1'
    assert with_bool_comparisons(expr) == (
        'sum(rate(x_total{code!="a>b", le=~"1|2"}[5m])) > bool 0.5 and y <= bool 3 and z == bool 1'
    )
