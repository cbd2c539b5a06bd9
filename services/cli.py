"""``mammoth`` command line: presets, tiny checkpoints, serving and client commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS, parameter_report

    report = parameter_report()
    if args.json:
        print(json.dumps(report))
        return 0
    for name, entry in report.items():
        print(f"{name:20s} {PRESETS[name].family:10s} total {entry['total'] / 1e9:8.3f}B  "
              f"active {entry['active'] / 1e9:8.3f}B   {entry['description']}")
        for stage, counts in entry["stages"].items():
            print(f"    {stage:8s} total {counts['total'] / 1e9:8.3f}B  active {counts['active'] / 1e9:8.3f}B")
    return 0


def _cmd_init_tiny(args: argparse.Namespace) -> int:
    from .model_dir import init_random
    from .presets import get_preset

    if not get_preset(args.preset).tiny:
        print(f"init-tiny: {args.preset} is not a tiny preset", file=sys.stderr)
        return 2
    index = init_random(args.directory, args.preset, args.seed, overwrite=args.force)
    print(json.dumps({"directory": str(index.root), "preset": index.preset, "stages": index.stages}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammoth", description="Mammoth Serve: MammothModa2/2.5 serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list presets with parameter counts (meta device, no memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("init-tiny", help="write a random-weight tiny model directory")
    p.add_argument("directory")
    p.add_argument("--preset", default="tiny-mammoth2", choices=["tiny-mammoth2", "tiny-mammoth25"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_cmd_init_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # user errors: one line, no traceback
        print(f"mammoth {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
