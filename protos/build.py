"""Regenerate (or check) the committed Python stubs of every ``protos/*.proto``.

    python -m protos.build           # write protos/<name>_pb2.py, _pb2.pyi, _pb2_grpc.py
    python -m protos.build --check   # exit 1 listing stale, missing or orphaned stubs

Stubs are generated with the repository root as the only include path, so ``protos/x.proto``
imports ``protos/common.proto`` and the generated code imports ``from protos import
common_pb2``: the same module path the installed package and the Ray Serve proxy use. The
check regenerates into a temporary directory and compares bytes, so it never touches the tree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PACKAGE = PROTO_DIR.name  # "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def expected_stubs() -> list[str]:
    """File names the current .proto files generate, e.g. ``common_pb2.py``."""
    return sorted(p.stem + suffix for p in proto_files() for suffix in GENERATED_SUFFIXES)


def existing_stubs() -> list[str]:
    return sorted(p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def generate(out_root: Path) -> Path:
    """Run protoc (from grpcio-tools) for every proto; return the folder holding the stubs."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # a dev dependency only: users import the committed stubs
        raise SystemExit("protos.build needs grpcio-tools (pip install -e '.[dev]')") from exc
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),  # protoc maps them to include-relative names
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return out_root / PACKAGE


def stale_stubs() -> list[str]:
    """Committed stubs that differ from a fresh generation, are missing, or have no .proto."""
    with tempfile.TemporaryDirectory(prefix="mammoth-protos-") as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for name in expected_stubs():
            committed = PROTO_DIR / name
            if not committed.is_file():
                stale.append(f"{name} (missing)")
            elif committed.read_bytes() != (fresh / name).read_bytes():
                stale.append(f"{name} (out of date)")
        stale += [f"{name} (no .proto)" for name in existing_stubs() if name not in expected_stubs()]
    return stale


def build() -> list[str]:
    """Regenerate the stubs in place; return the names of the files written or removed."""
    changed = []
    with tempfile.TemporaryDirectory(prefix="mammoth-protos-") as tmp:
        fresh = generate(Path(tmp))
        for name in expected_stubs():
            target = PROTO_DIR / name
            data = (fresh / name).read_bytes()
            if not target.is_file() or target.read_bytes() != data:
                shutil.copyfile(fresh / name, target)
                changed.append(name)
    for name in existing_stubs():
        if name not in expected_stubs():
            (PROTO_DIR / name).unlink()
            changed.append(name)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any committed stub is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for line in stale:
            print(f"stale: protos/{line}", file=sys.stderr)
        if stale:
            print("run `python -m protos.build` (or `make protos`) and commit the result", file=sys.stderr)
            return 1
        print(f"protos: {len(expected_stubs())} stubs up to date")
        return 0
    changed = build()
    print(f"protos: {len(changed)} file(s) updated" + (": " + ", ".join(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
