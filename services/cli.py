"""``mammoth`` command line: presets, tiny checkpoints, serving and client commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


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


def _write_or_print(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def _cmd_config_render(args: argparse.Namespace) -> int:
    from .config import ServeConfig
    from .render import render_yaml

    cfg = ServeConfig.load(args.config) if args.config else ServeConfig()
    _write_or_print(render_yaml(cfg, source=args.config), args.output)
    return 0


def _cmd_config_default(args: argparse.Namespace) -> int:
    from .config import ServeConfig

    make = ServeConfig.default_gpu if args.gpu else ServeConfig.default_cpu
    _write_or_print(make(args.model).dump(), args.output)
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

    p = sub.add_parser("config", help="the serving config: write defaults, render the Ray Serve config")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    r = config_sub.add_parser("render", help="render the Ray Serve config (serve run / KubeRay serveConfigV2)")
    r.add_argument("--config", help="mammoth config YAML (default: the built-in CPU defaults)")
    r.add_argument("-o", "--output", help="write here instead of stdout")
    r.set_defaults(func=_cmd_config_render)
    d = config_sub.add_parser("default", help="print a complete default config to edit")
    d.add_argument("--gpu", action="store_true", help="GPU defaults (num_gpus, autoscaling) instead of CPU")
    d.add_argument("--model", help="model directory (default: the tiny-mammoth2 preset)")
    d.add_argument("-o", "--output", help="write here instead of stdout")
    d.set_defaults(func=_cmd_config_default)
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
