"""Validate a custom resource against its CRD's ``openAPIV3Schema`` like a strict API server.

The KubeRay CRDs are read from ``../shared/kuberay-crds`` (never copied into the repository).
Objects with ``properties`` and neither ``additionalProperties`` nor
``x-kubernetes-preserve-unknown-fields`` reject unknown fields, as the API server prunes or
(with ``fieldValidation=Strict``) rejects them; ``nullable`` admits null. CEL rules are not
evaluated.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The strict JSON schema of ``kind`` (e.g. ``RayService``) at ``version``."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for entry in crd["spec"]["versions"]:
            if entry["name"] == version:
                return _strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
    raise LookupError(f"no CRD for {kind} {version} in {CRD_DIR}")


def validate_custom(obj: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``obj`` does not fit its CRD."""
    group_version = obj["apiVersion"]
    version = group_version.split("/", 1)[1]
    schema = crd_schema(obj["kind"], version)
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    schema = {**schema, "properties": {k: v for k, v in schema["properties"].items()
                                       if k not in ("apiVersion", "kind", "metadata")}}
    jsonschema.Draft7Validator(schema).validate(body)
