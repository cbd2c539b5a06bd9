"""The main job on the embedded default: serve the tiny models, use every task, stop.

Builds the tiny checkpoints once (into the config's cache dir), brings the full served
pipeline up on a local Ray cluster, then acts as a client over gRPC (or HTTP): an image, an
edit of that image, a video, an edit of that video and an answer about the image land in
``out/``; finally everything it started is stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .client import MammothClient
from .config import ServeConfig
from .deploy import serve_down, serve_up


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(out: Path, *, config_path: str | None = None, use_http: bool = False) -> int:
    cfg = ServeConfig.load(config_path) if config_path else ServeConfig.default_cpu()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        _log("starting Ray Serve with the tiny CPU models (first run builds them)...")
        serve_up(cfg)
        _log(f"serving after {time.perf_counter() - start:.0f}s")
        client = MammothClient(f"localhost:{cfg.ingress.grpc_port}", f"http://localhost:{cfg.ingress.http_port}",
                               use_http=use_http)
        try:
            image = client.generate_image("a lighthouse on a cliff at sunset, oil painting", seed=1)
            (out / "image.png").write_bytes(image.data)
            summary["image"] = {"file": "image.png", "size": [image.width, image.height], "timings": image.timings}
            _log("image.png")
            edit = client.edit_image([image.data], "make the sky stormy", seed=2)
            (out / "edit.png").write_bytes(edit.data)
            summary["edit"] = {"file": "edit.png", "size": [edit.width, edit.height], "timings": edit.timings}
            _log("edit.png")
            video = client.generate_video("waves rolling onto a sandy beach", seed=3)
            (out / "video.mp4").write_bytes(video.data)
            summary["video"] = {"file": "video.mp4", "size": [video.width, video.height], "frames": video.frames,
                                "timings": video.timings}
            _log("video.mp4")
            video_edit = client.edit_video(video.data, "turn it into a night scene", seed=4)
            (out / "video_edit.mp4").write_bytes(video_edit.data)
            summary["video_edit"] = {"file": "video_edit.mp4", "frames": video_edit.frames,
                                     "timings": video_edit.timings}
            _log("video_edit.mp4")
            answer = "".join(client.ask("What is shown in this image?", [("image", image.data)], max_tokens=32, seed=5))
            (out / "answer.txt").write_text(answer + "\n")
            summary["answer"] = {"file": "answer.txt", "chars": len(answer)}
            _log("answer.txt")
        finally:
            client.close()
    finally:
        serve_down()
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
