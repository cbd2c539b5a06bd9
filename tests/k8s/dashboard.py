"""The Grafana dashboard's queries: each PromQL expression parsed, and the metric names it reads.

Shared by the static dashboard test and the served check against Ray's real Prometheus export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "mammoth-dashboard.json"

# Grafana expands these before Prometheus sees a query; stand-ins that keep the PromQL valid.
_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${model}": ".*", "$model": ".*"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested ones too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]


def expand(expr: str) -> str:
    for macro, value in _MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (raises ValueError if it does not parse)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expand(expr)), visit)
    return names


def variable_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metrics the template variables read (``label_values(metric, label)`` queries)."""
    names: set[str] = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query.strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: expected label_values(metric, label), got {query!r}")
        names.add(match.group(1))
    return names


def dashboard_metric_names(dashboard: dict[str, Any] | None = None) -> set[str]:
    """Every series name the dashboard reads, from panels and variables."""
    dashboard = load() if dashboard is None else dashboard
    names = variable_metric_names(dashboard)
    for _, expr in expressions(dashboard):
        names |= metric_names(expr)
    return names
