"""House rule: a stage package imports no other stage, no Ray and no ``services``.

Dependencies flow services -> stage packages (planner/, dit_worker/, vae_worker/,
mammoth_common/) -> torch/vllm/diffusers. A stage that reaches into another one (or into
Ray) cannot be deployed, tested or replaced on its own; what stages share lives in
``mammoth_common``, which imports no stage at all. Scanned from source (AST), so lazy imports
inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("planner", "dit_worker", "vae_worker")
COMMON = "mammoth_common"
FORBIDDEN_EVERYWHERE = ("ray", "services")


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in one module (relative imports stay inside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value.split(".")[0])  # importlib.import_module("x.y")
    return found


def violations(package: str) -> list[str]:
    forbidden = set(FORBIDDEN_EVERYWHERE) | (set(STAGES) - {package})
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for bad in sorted(imported_packages(path) & forbidden):
            out.append(f"{path.relative_to(ROOT)} imports {bad}")
    return out


@pytest.mark.parametrize("package", [*STAGES, COMMON])
def test_stage_package_imports_no_other_stage_ray_or_services(package):
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_scan_sees_every_import_form(tmp_path):
    """The checker itself must catch plain, from-, lazy and importlib imports (else it proves nothing)."""
    module = tmp_path / "m.py"
    module.write_text("import ray.serve\nfrom services.jobs import x\nfrom . import sibling\n"
                      "def f():\n    from dit_worker.checkpoint import DataclassConfig\n"
                      "    import importlib\n    importlib.import_module('vae_worker.engine')\n")
    assert imported_packages(module) == {"ray", "services", "dit_worker", "importlib", "vae_worker"}
