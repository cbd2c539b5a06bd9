"""``mammoth`` command line: presets, tiny checkpoints, serving and client commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_dit_placement(args: argparse.Namespace) -> int:
    """Balanced expert -> rank placement from measured expert loads (EPLB-style)."""
    from dit_worker.parallel.placement import ExpertPlacement, loads_from_metrics, summarize

    loads = loads_from_metrics(Path(args.from_metrics).read_text())
    if args.per_layer is False and isinstance(loads, dict):
        loads = [sum(col) for col in zip(*loads.values())]
    placement = ExpertPlacement.balanced(loads, args.world_size, replicas=args.replicas)
    before = ExpertPlacement.contiguous(placement.num_experts, args.world_size)
    placement.save(args.output)
    print(json.dumps({"output": args.output, **summarize(loads, before, placement)}))
    return 0


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


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertError, convert

    try:
        overrides = json.loads(args.dit_overrides) if args.dit_overrides else None
        index = convert(args.source, args.destination, getattr(args, "from"), overwrite=args.force,
                        shard_bytes=int(args.shard_gb * (1 << 30)), dit_overrides=overrides)
    except (ConvertError, ValueError) as exc:
        print(f"convert: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"directory": str(index.root), "family": index.family, "preset": index.preset,
                      "stages": index.stages}))
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


def _load_config(path: str | None):
    from .config import ServeConfig

    return ServeConfig.load(path) if path else ServeConfig.default_cpu()


def _cmd_serve(args: argparse.Namespace) -> int:
    from .deploy import ServeProcess

    cfg = _load_config(args.config)
    ingress = cfg.ingress

    def ready(_rendered, starting: list[str]) -> None:
        serving = [m for m in cfg.models if m not in starting]
        later = f", starting {', '.join(starting)}" if starting else ""
        print(f"serving: gRPC {ingress.host}:{ingress.grpc_port}  HTTP http://{ingress.host}:{ingress.http_port}  "
              f"models {', '.join(serving)}{later} (Ctrl-C or SIGTERM to stop)", flush=True)

    def model_ready(models: list[str]) -> None:
        print(f"ready: models {', '.join(models)}", flush=True)

    code = ServeProcess(cfg, address=args.address).run(on_ready=ready, on_model_ready=model_ready)
    print("stopped", flush=True)
    return code


def _k8s_config(args: argparse.Namespace):
    from .config import ServeConfig
    from .k8s.manifests import profile_config

    if args.config:
        cfg = ServeConfig.load(args.config)
        return cfg, args.profile or cfg.device
    profile = args.profile or "gpu"
    return profile_config(profile), profile


def _k8s_objects(args: argparse.Namespace) -> list[dict]:
    from .k8s.manifests import render_manifests

    cfg, profile = _k8s_config(args)
    return render_manifests(cfg, profile, image=getattr(args, "image", None), namespace=args.namespace)


def _cmd_k8s_render(args: argparse.Namespace) -> int:
    from .k8s.manifests import manifests_yaml

    objects = _k8s_objects(args)
    command = "mammoth k8s render --profile " + _k8s_config(args)[1] + (f" --config {args.config}" if args.config else "")
    _write_or_print(manifests_yaml(objects, command=command), args.output)
    return 0


def _k8s_cluster(args: argparse.Namespace):
    from .k8s.kubectl import Cluster, api_client

    return Cluster(api_client(kubeconfig=args.kubeconfig, context=args.context))


def _k8s_run(args: argparse.Namespace, work) -> int:
    from .k8s.kubectl import K8sError

    try:
        return work()
    except K8sError as exc:
        print(f"mammoth k8s {args.k8s_command}: {exc}", file=sys.stderr)
        return 1


def _cmd_k8s_apply(args: argparse.Namespace) -> int:
    def work() -> int:
        objects, cluster = _k8s_objects(args), _k8s_cluster(args)
        for obj in objects:
            meta = obj["metadata"]
            print(f"{obj['kind']} {meta['namespace']}/{meta['name']} {cluster.apply(obj)}", flush=True)
        return 0

    return _k8s_run(args, work)


def _cmd_k8s_delete(args: argparse.Namespace) -> int:
    def work() -> int:
        objects, cluster = _k8s_objects(args), _k8s_cluster(args)
        for obj in reversed(objects):
            meta = obj["metadata"]
            print(f"{obj['kind']} {meta['namespace']}/{meta['name']} {cluster.delete(obj)}", flush=True)
        return 0

    return _k8s_run(args, work)


def _cmd_k8s_status(args: argparse.Namespace) -> int:
    from .k8s.kubectl import format_status, parse_status

    def work() -> int:
        cfg, _ = _k8s_config(args)
        namespace = args.namespace or cfg.k8s.namespace
        parsed = parse_status(_k8s_cluster(args).rayservice(namespace, args.name or cfg.k8s.name))
        print(json.dumps(parsed) if args.json else format_status(parsed))
        return 0 if parsed["ready"] else 3

    return _k8s_run(args, work)


def _client(args: argparse.Namespace):
    from .client import MammothClient

    return MammothClient(args.grpc, args.url, use_http=args.http, api_key=args.api_key, timeout_s=args.timeout)


def _generation_options(args: argparse.Namespace) -> dict:
    options = {"steps": args.steps, "seed": args.seed, "guidance": args.guidance,
               "negative_prompt": args.negative_prompt, "model": args.model}
    if args.size:
        width, _, height = args.size.lower().partition("x")
        options["width"], options["height"] = int(width), int(height)
    for name in ("frames", "fps"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def _run_generation(args: argparse.Namespace, call) -> int:
    from .client import ClientError, Progress, write_output

    progress = Progress(enabled=not args.quiet, label=args.command)
    client = _client(args)
    try:
        output = call(client, progress)
    except ClientError as exc:
        print(f"mammoth {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        client.close()
    path = write_output(output, args.output)
    print(json.dumps({"output": str(path), "mime_type": output.mime_type, "width": output.width,
                      "height": output.height, "frames": output.frames, "seed": output.seed,
                      "timings": {k: round(v, 3) for k, v in output.timings.items()}}))
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    return _run_generation(args, lambda c, p: c.generate_image(args.prompt, progress=p, **_generation_options(args)))


def _cmd_edit(args: argparse.Namespace) -> int:
    images = [Path(p).read_bytes() for p in args.image]
    return _run_generation(args, lambda c, p: c.edit_image(images, args.instruction, progress=p,
                                                           **_generation_options(args)))


def _cmd_video(args: argparse.Namespace) -> int:
    return _run_generation(args, lambda c, p: c.generate_video(args.prompt, progress=p, **_generation_options(args)))


def _cmd_video_edit(args: argparse.Namespace) -> int:
    video = Path(args.video).read_bytes()
    return _run_generation(args, lambda c, p: c.edit_video(video, args.instruction, progress=p,
                                                           **_generation_options(args)))


def _media_kind(path: str) -> str:
    return "video" if Path(path).suffix.lower() in (".mp4", ".webm", ".mov", ".mkv") else "image"


def _cmd_ask(args: argparse.Namespace) -> int:
    from .client import ClientError

    client = _client(args)
    media = [(_media_kind(p), Path(p).read_bytes()) for p in args.media]
    try:
        for delta in client.ask(args.question, media, max_tokens=args.max_tokens, seed=args.seed,
                                model=args.model):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except ClientError as exc:
        print(f"\nmammoth ask: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    sys.stdout.write("\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), config_path=args.config, use_http=args.http)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", action="store_true", help="use the HTTP API instead of gRPC")
    p.add_argument("--grpc", default="localhost:9000", help="gRPC target (default localhost:9000)")
    p.add_argument("--url", default="http://localhost:8000", help="HTTP base URL")
    p.add_argument("--api-key", default=None, help="API key (if the server requires one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    p.add_argument("--model", help="a served model's name (GET /v1/models); default: the task's default model")


def _generation_args(p: argparse.ArgumentParser, *, video: bool = False) -> None:
    _client_args(p)
    p.add_argument("-o", "--output", required=True, help="output file (.png/.jpg/.webp or .mp4/.gif)")
    p.add_argument("--size", help="WIDTHxHEIGHT in pixels (multiples of 16)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--guidance", type=float, help="text guidance scale")
    p.add_argument("--negative-prompt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    if video:
        p.add_argument("--frames", type=int, help="4k+1 frames")
        p.add_argument("--fps", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammoth", description="Mammoth Serve: MammothModa2/2.5 serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list presets with parameter counts (meta device, no memory)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_presets)

    from .presets import PRESETS  # the tiny presets of every registered family

    p = sub.add_parser("init-tiny", help="write a random-weight tiny model directory")
    p.add_argument("directory")
    p.add_argument("--preset", default="tiny-mammoth2", choices=[n for n, preset in PRESETS.items() if preset.tiny])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_cmd_init_tiny)

    p = sub.add_parser("convert", help="an official checkpoint directory -> a model directory (strict)")
    p.add_argument("source", help="the official checkpoint directory (downloaded elsewhere)")
    p.add_argument("destination", help="the model directory to write")
    p.add_argument("--from", required=True, choices=["mammothmoda2", "mammothmoda2-preview", "mammothmoda25"],
                   help="the official format")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size")
    p.add_argument("--dit-overrides", help="JSON: moe / refiner / text_len for 2.5 checkpoints whose sizes "
                                           "the official code's constants do not describe")
    p.set_defaults(func=_cmd_convert)

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

    p = sub.add_parser("serve", help="start (or join) a Ray cluster and serve the pipeline")
    p.add_argument("--config", help="mammoth config YAML (default: tiny CPU models, built on first use)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("k8s", help="the KubeRay RayService: render manifests, apply, status, delete")
    k8s_sub = p.add_subparsers(dest="k8s_command", required=True)
    for name, func, help_text in (
        ("render", _cmd_k8s_render, "print the manifests (RayService, Service, PDBs, NetworkPolicy)"),
        ("apply", _cmd_k8s_apply, "create or patch the manifests on a cluster"),
        ("status", _cmd_k8s_status, "readiness of the RayService, its applications and deployments"),
        ("delete", _cmd_k8s_delete, "delete the manifests from a cluster"),
    ):
        k = k8s_sub.add_parser(name, help=help_text)
        k.add_argument("--profile", choices=["gpu", "cpu"], help="default: the config's device, else gpu")
        k.add_argument("--config", help="mammoth config YAML (default: the profile's built-in config)")
        k.add_argument("--namespace", help="default: k8s.namespace of the config")
        if name == "render":
            k.add_argument("--image", help="container image (default: k8s.image, else mammoth-serve:<version>-<profile>)")
            k.add_argument("-o", "--output", help="write here instead of stdout")
        else:
            k.add_argument("--context", help="kubeconfig context (default: the current one)")
            k.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        if name == "apply":
            k.add_argument("--image", help="container image")
        if name == "status":
            k.add_argument("--name", help="RayService name (default: k8s.name)")
            k.add_argument("--json", action="store_true", help="one JSON object")
        k.set_defaults(func=func)

    p = sub.add_parser("image", help="text to image")
    p.add_argument("prompt")
    _generation_args(p)
    p.set_defaults(func=_cmd_image)

    p = sub.add_parser("edit", help="edit an image with an instruction")
    p.add_argument("image", nargs="+", help="image(s): the first is edited, the rest are references")
    p.add_argument("instruction")
    _generation_args(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("video", help="text to video")
    p.add_argument("prompt")
    _generation_args(p, video=True)
    p.set_defaults(func=_cmd_video)

    p = sub.add_parser("video-edit", help="edit a video with an instruction")
    p.add_argument("video")
    p.add_argument("instruction")
    _generation_args(p, video=True)
    p.set_defaults(func=_cmd_video_edit)

    p = sub.add_parser("ask", help="ask about an image or a video (streamed answer)")
    p.add_argument("media", nargs="*", help="image or video files")
    p.add_argument("question")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int)
    _client_args(p)
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("dit", help="DiT worker pool tools")
    dit_sub = p.add_subparsers(dest="dit_command", required=True)
    d = dit_sub.add_parser("placement", help="balanced expert->rank placement from expert load metrics "
                                             "(apply it with dit.engine.parallel.placement_file)")
    d.add_argument("--from-metrics", required=True, metavar="FILE",
                   help="the DiT's expert_metrics() JSON or Prometheus text with mammoth_expert_tokens_total")
    d.add_argument("--world-size", type=int, required=True, help="ranks per DiT replica (parallel.size)")
    d.add_argument("--replicas", type=int, default=0, help="extra copies for the hottest experts (default 0)")
    d.add_argument("--global", dest="per_layer", action="store_false", default=True,
                   help="one placement for every layer instead of one per layer")
    d.add_argument("-o", "--output", default="placement.json", help="placement file to write")
    d.set_defaults(func=_cmd_dit_placement)

    p = sub.add_parser("demo", help="serve the tiny models, make an image, an edit, a video and an answer, stop")
    p.add_argument("--out", default="out", help="output folder (default ./out)")
    p.add_argument("--config", help="mammoth config YAML (default: tiny CPU models)")
    p.add_argument("--http", action="store_true", help="drive the demo through the HTTP API")
    p.set_defaults(func=_cmd_demo)
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
