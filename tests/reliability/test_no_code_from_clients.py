"""No client bytes become code: no serving package unpickles, evals or loads pickled checkpoints.

Requests arrive as protobuf or JSON; Ray pickles only objects our own processes made (handle
arguments between replicas). A call that turns bytes into objects or code (``pickle.loads``,
``cloudpickle``, ``marshal``, ``eval``/``exec``, ``torch.load`` without ``weights_only``,
``numpy.load(allow_pickle=True)``) anywhere in the code that handles requests would let a
request field become one, so none may appear there at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "planner", "dit_worker", "vae_worker", "mammoth_common", "protos")
# (module, attribute) calls that deserialize objects or run code from bytes.
FORBIDDEN_ATTRS = {
    ("pickle", "loads"), ("pickle", "load"), ("pickle", "Unpickler"),
    ("cloudpickle", "loads"), ("cloudpickle", "load"),
    ("marshal", "loads"), ("marshal", "load"), ("dill", "loads"), ("dill", "load"),
    ("shelve", "open"), ("jsonpickle", "decode"),
}
FORBIDDEN_MODULES = {"pickle", "cloudpickle", "marshal", "dill", "shelve", "jsonpickle"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if not p.name.endswith("_pb2.py")]
    assert len(files) > 50, files  # the packages were found
    return files


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(tree: ast.AST) -> list[str]:
    """Every forbidden import or call in one module's syntax tree (line: what)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
                found.append(f"{node.lineno}: {func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, attr = func.value.id, func.attr
                if (owner, attr) in FORBIDDEN_ATTRS:
                    found.append(f"{node.lineno}: {owner}.{attr}()")
                elif owner == "torch" and attr == "load":
                    weights_only = _keyword(node, "weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        found.append(f"{node.lineno}: torch.load() without weights_only=True")
                elif owner in ("np", "numpy") and attr == "load":
                    allow = _keyword(node, "allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        found.append(f"{node.lineno}: numpy.load(allow_pickle=...)")
    return found


def test_the_checker_finds_each_forbidden_form():
    source = "\n".join([
        "import pickle", "from cloudpickle import loads", "import marshal as m",
        "pickle.loads(b'')", "eval('1')", "exec('x=1')", "torch.load(f)", "torch.load(f, weights_only=False)",
        "np.load(f, allow_pickle=True)", "__import__('os')",
        "torch.load(f, weights_only=True)", "np.load(f)", "model.eval()",  # these three are fine
    ])
    assert len(findings(ast.parse(source))) == 10, findings(ast.parse(source))


def test_no_serving_module_unpickles_or_evaluates_anything():
    offenders = {}
    for path in _sources():
        found = findings(ast.parse(path.read_text(), filename=str(path)))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders
