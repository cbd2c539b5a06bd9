"""The Grafana dashboard (k8s/grafana/mammoth-dashboard.json): well-formed, every query parses
as PromQL, and every ``ray_mammoth_*`` series it reads is one the code defines.

That each series is really exported is checked against Ray's Prometheus endpoint of a served
pipeline in tests/served/test_playground.py (``test_dashboard_metrics_are_exported``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.k8s import dashboard as dash

ROOT = Path(__file__).resolve().parents[2]
_DEFINITION = re.compile(r"\b(Histogram|Counter|Gauge)\(\s*\"(mammoth_[a-z0-9_]+)\"")
# Ray's Prometheus export: its own prefix, and a histogram's three series.
_SERIES = {"Histogram": ("_bucket", "_sum", "_count"), "Counter": ("",), "Gauge": ("",)}

# The issue's topics -> the code metrics (without Ray's prefix) a panel must read for each.
TOPICS = {
    "queue depth": {"mammoth_stage_in_flight"},
    "stage latency": {"mammoth_stage_latency_seconds"},
    "denoise step time": {"mammoth_denoise_step_seconds"},
    "tokens planned": {"mammoth_planned_tokens_total"},
    "expert load": {"mammoth_expert_tokens_total", "mammoth_expert_load_imbalance"},
    "batch sizes": {"mammoth_dit_batch_size"},
}


def defined_metrics() -> dict[str, str]:
    """Metric name -> kind, for every metric the deployments create (``ray.serve.metrics``)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for kind, name in _DEFINITION.findall(path.read_text()):
            found[name] = kind
    return found


def exported_series(defined: dict[str, str]) -> dict[str, str]:
    """Series name as Prometheus shows it -> the code metric behind it."""
    return {f"ray_{name}{suffix}": name for name, kind in defined.items() for suffix in _SERIES[kind]}


@pytest.fixture(scope="module")
def dashboard():
    return dash.load()


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    all_panels = list(dash.panels(dashboard))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    graphs = [p for p in all_panels if p["type"] != "row"]
    assert len(graphs) >= 6
    for panel in graphs:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["targets"], f"{where}: no query"
        assert panel["datasource"]["uid"] == "${datasource}", f"{where}: not on the datasource variable"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{where}: gridPos {grid}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refId"


def test_every_query_parses_as_promql(dashboard):
    exprs = list(dash.expressions(dashboard))
    assert exprs
    for where, expr in exprs:
        try:
            names = dash.metric_names(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {expr!r} does not parse: {exc}")
        assert names, f"{where}: selects no series"


def test_the_parser_rejects_broken_promql():
    """The check above can fail: an unbalanced query is refused, selectors are found in nesting."""
    with pytest.raises(ValueError):
        dash.metric_names("sum(rate(ray_mammoth_stage_in_flight[5m])")
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{model=~"$model"}[$__rate_interval]))) / on() b'
    assert dash.metric_names(expr) == {"a_bucket", "b"}


def test_every_mammoth_series_is_defined_in_the_code(dashboard):
    defined = defined_metrics()
    assert {"mammoth_stage_latency_seconds", "mammoth_denoise_step_seconds"} <= set(defined)
    series = exported_series(defined)
    names = dash.dashboard_metric_names(dashboard)
    unknown = sorted(n for n in names if n.startswith("ray_mammoth_") and n not in series)
    assert not unknown, f"the dashboard reads series no deployment defines: {unknown}"
    others = sorted(n for n in names if not n.startswith(("ray_mammoth_", "ray_serve_")))
    assert not others, f"series that are neither Mammoth's nor Ray Serve's: {others}"


def test_every_topic_of_the_issue_has_a_panel(dashboard):
    series = exported_series(defined_metrics())
    read = {series[n] for n in dash.dashboard_metric_names(dashboard) if n in series}
    missing = {topic: sorted(need - read) for topic, need in TOPICS.items() if not need <= read}
    assert not missing, f"topics without their metrics on the dashboard: {missing}"
