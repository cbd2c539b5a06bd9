"""services/ asks the family registry; it never branches on a family's name."""

from __future__ import annotations

import ast
from pathlib import Path

from services.families import families

ROOT = Path(__file__).resolve().parents[2]


def test_services_never_branch_on_a_family_name():
    """Family names appear only where a family or preset is declared (and the converter, which
    writes a given official layout as a given family)."""
    allowed = {"services/presets.py", "services/convert.py"}
    hits = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("services/families/") or rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in families():
                hits.append(f"{rel}:{node.lineno} {node.value!r}")
    assert hits == []
