"""Client for a running Mammoth Serve: gRPC (default) or the HTTP API, with progress bars.

Used by the ``mammoth image|edit|video|video-edit|ask`` commands and by the demo.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from protos import common_pb2, generation_pb2, generation_pb2_grpc

INGRESS_APP = "mammoth"
MIME_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".mp4": "mp4", ".gif": "gif"}


class ClientError(RuntimeError):
    """The server refused or failed a request; ``code`` is the gRPC code or HTTP status."""

    def __init__(self, code: Any, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class GenerationOutput:
    data: bytes
    mime_type: str
    width: int
    height: int
    frames: int = 1
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    index: int = 0  # which image of a num_images request
    more: list[GenerationOutput] = field(default_factory=list)  # the other images (num_images > 1)


ProgressFn = Callable[[str, int, int], None]


class Progress:
    """A terminal progress bar over denoising steps (silent when not a TTY or disabled)."""

    def __init__(self, enabled: bool = True, label: str = ""):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.bar = None

    def __call__(self, phase: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        if phase == "denoise":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label or "denoise", unit="step", leave=False)
            self.bar.n = step
            self.bar.refresh()
        elif self.bar is None:
            sys.stderr.write(f"\r{self.label} {phase}...")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MammothClient:
    def __init__(self, grpc_target: str = "localhost:9000", http_url: str = "http://localhost:8000",
                 *, use_http: bool = False, api_key: str | None = None, timeout_s: float = 600.0):
        self.use_http = use_http
        self.http_url = http_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._channel = None if use_http else grpc.insecure_channel(
            grpc_target, options=[("grpc.max_receive_message_length", 512 * 1024 * 1024),
                                  ("grpc.max_send_message_length", 512 * 1024 * 1024)])
        self._stub = generation_pb2_grpc.GenerationStub(self._channel) if self._channel else None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [("application", INGRESS_APP)]
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        return metadata

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- gRPC ----------------------------------------------------------------------------------
    def _consume(self, stream: Iterator[generation_pb2.GenerationEvent], progress: ProgressFn | None) -> GenerationOutput:
        """Progress to ``progress``; the first image, with the others (``num_images``) in ``more``."""
        events: list[str] = []
        outputs: list[GenerationOutput] = []
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                events.append(kind)
                if progress is not None:
                    if kind == "denoise_step":
                        progress("denoise", event.denoise_step.step, event.denoise_step.total)
                    elif kind in ("queued", "planning", "decoding"):
                        progress(kind, 0, 0)
                if kind == "result":
                    r = event.result
                    outputs.append(GenerationOutput(r.media.data, r.media.mime_type, r.width, r.height, r.frames,
                                                    r.seed, dict(r.timings.seconds), events, r.index))
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None
        if not outputs:
            raise ClientError("INTERNAL", "the stream ended without a result")
        outputs.sort(key=lambda o: o.index)
        outputs[0].more = outputs[1:]
        return outputs[0]

    def generate_image(self, prompt: str, *, progress: ProgressFn | None = None, **options: Any) -> GenerationOutput:
        if self.use_http:
            return self._http_image("/v1/images/generations", prompt, [], progress, options)
        request = generation_pb2.GenerateImageRequest(prompt=prompt, **_image_options(options))
        return self._consume(self._stub.GenerateImage(request, metadata=self._metadata(), timeout=self.timeout_s),
                             progress)

    def edit_image(self, images: list[bytes], instruction: str, *, progress: ProgressFn | None = None,
                   **options: Any) -> GenerationOutput:
        if self.use_http:
            return self._http_image("/v1/images/edits", instruction, images, progress, options)
        request = generation_pb2.EditImageRequest(instruction=instruction, **_image_options(options))
        request.reference_images.extend(common_pb2.Media(data=d) for d in images)
        return self._consume(self._stub.EditImage(request, metadata=self._metadata(), timeout=self.timeout_s),
                             progress)

    def generate_video(self, prompt: str, *, progress: ProgressFn | None = None, **options: Any) -> GenerationOutput:
        if self.use_http:
            return self._http_video(prompt, None, progress, options)
        request = generation_pb2.GenerateVideoRequest(prompt=prompt, **_video_options(options))
        return self._consume(self._stub.GenerateVideo(request, metadata=self._metadata(), timeout=self.timeout_s),
                             progress)

    def edit_video(self, video: bytes, instruction: str, *, progress: ProgressFn | None = None,
                   **options: Any) -> GenerationOutput:
        if self.use_http:
            return self._http_video(instruction, video, progress, options)
        request = generation_pb2.EditVideoRequest(instruction=instruction, source_video=common_pb2.Media(data=video),
                                                  **_video_options(options))
        return self._consume(self._stub.EditVideo(request, metadata=self._metadata(), timeout=self.timeout_s),
                             progress)

    def ask(self, question: str, media: list[tuple[str, bytes]] = (), *, max_tokens: int = 128,
            seed: int | None = None, model: str | None = None) -> Iterator[str]:
        """Stream the answer's text deltas; ``media`` is a list of ("image"|"video", bytes);
        ``model``: a served model's name (None: the server's default for understanding)."""
        if self.use_http:
            yield from self._http_ask(question, media, max_tokens, seed, model)
            return
        request = generation_pb2.UnderstandRequest(max_tokens=max_tokens, model=model or "")
        if seed is not None:
            request.seed = seed
        message = request.messages.add(role="user")
        for kind, data in media:
            message.content.add(**{kind: common_pb2.Media(data=data)})
        message.content.add(text=question)
        try:
            for event in self._stub.Understand(request, metadata=self._metadata(), timeout=self.timeout_s):
                if event.text:
                    yield event.text
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None

    # -- HTTP ----------------------------------------------------------------------------------
    def _http_stream(self, path: str, body: dict[str, Any], progress: ProgressFn | None) -> list[dict[str, Any]]:
        """OpenAI's image stream (with Mammoth's progress events): every ``*.completed`` payload."""
        import httpx

        completed: list[dict[str, Any]] = []

        with httpx.stream("POST", self.http_url + path, json=body, headers=self._headers(),
                          timeout=self.timeout_s) as response:
            if response.status_code != 200:
                response.read()
                raise ClientError(response.status_code, _http_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = json.loads(line[6:])
                kind = payload.get("type")
                if kind == "error":
                    raise ClientError(payload["error"]["type"], payload["error"]["message"])
                if progress is not None and kind == "denoise_step":
                    progress("denoise", payload["step"], payload["total"])
                if kind in ("image_generation.completed", "image_edit.completed"):
                    completed.append(payload)
        if not completed:
            raise ClientError("INTERNAL", "the event stream ended without a result")
        return completed

    def _http_image(self, path: str, prompt: str, images: list[bytes], progress: ProgressFn | None,
                    options: dict[str, Any]) -> GenerationOutput:
        body = _http_image_body(prompt, options)
        body["images"] = [base64.b64encode(d).decode() for d in images]
        body["stream"] = True
        body["progress_events"] = True
        if not images:
            body.pop("images")
        outputs = sorted((_output_from_json(p) for p in self._http_stream(path, body, progress)),
                         key=lambda o: o.index)
        outputs[0].more = outputs[1:]
        return outputs[0]

    def _http_video(self, prompt: str, video: bytes | None, progress: ProgressFn | None,
                    options: dict[str, Any]) -> GenerationOutput:
        import time

        import httpx

        body = {k: v for k, v in {"prompt": prompt, "size": _size(options), "frames": options.get("frames"),
                                  "fps": options.get("fps"), "steps": options.get("steps"),
                                  "seed": options.get("seed"), "guidance_scale": options.get("guidance"),
                                  "model": options.get("model")}.items()
                if v is not None}
        if video is not None:
            body["video"] = base64.b64encode(video).decode()
        with httpx.Client(base_url=self.http_url, headers=self._headers(), timeout=self.timeout_s) as http:
            created = http.post("/v1/videos", json=body)
            if created.status_code != 200:
                raise ClientError(created.status_code, _http_message(created))
            video_id = created.json()["id"]
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                state = http.get(f"/v1/videos/{video_id}").json()
                if progress is not None and state["status"] == "in_progress":
                    progress("denoise", state["progress"], 100)
                if state["status"] == "completed":
                    content = http.get(f"/v1/videos/{video_id}/content")
                    return GenerationOutput(content.content, state["mime_type"], state["width"], state["height"],
                                            state["frames"], state["seed"], state.get("timings", {}))
                if state["status"] == "failed":
                    raise ClientError(state["error"]["type"], state["error"]["message"])
                time.sleep(0.2)
        raise ClientError("DEADLINE_EXCEEDED", "video did not finish in time")

    def _http_ask(self, question: str, media: list[tuple[str, bytes]], max_tokens: int,
                  seed: int | None, model: str | None) -> Iterator[str]:
        import httpx

        content: list[dict[str, Any]] = []
        for kind, data in media:
            mime = "image/png" if kind == "image" else "video/mp4"
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            content.append({"type": f"{kind}_url", f"{kind}_url": {"url": url}})
        content.append({"type": "text", "text": question})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True}
        if seed is not None:
            body["seed"] = seed
        if model:
            body["model"] = model
        with httpx.stream("POST", self.http_url + "/v1/chat/completions", json=body, headers=self._headers(),
                          timeout=self.timeout_s) as response:
            if response.status_code != 200:
                response.read()
                raise ClientError(response.status_code, _http_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ClientError(chunk["error"]["type"], chunk["error"]["message"])
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    yield delta


def _size(options: dict[str, Any]) -> str | None:
    if options.get("width") and options.get("height"):
        return f"{options['width']}x{options['height']}"
    return None


def _image_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("width", "height", "steps", "seed", "negative_prompt", "num_images", "model")
    out = {k: options[k] for k in keys if options.get(k) is not None}
    if options.get("guidance") is not None:
        out["text_guidance"] = options["guidance"]
    return out


def _video_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("width", "height", "steps", "seed", "frames", "fps", "negative_prompt", "guidance", "model")
    return {k: options[k] for k in keys if options.get(k) is not None}


def _http_image_body(prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    body = {"prompt": prompt, "size": _size(options), "steps": options.get("steps"), "seed": options.get("seed"),
            "guidance_scale": options.get("guidance"), "negative_prompt": options.get("negative_prompt"),
            "n": options.get("num_images"), "model": options.get("model")}
    return {k: v for k, v in body.items() if v is not None}


def _output_from_json(payload: dict[str, Any]) -> GenerationOutput:
    """One ``image_generation.completed`` / ``image_edit.completed`` event."""
    return GenerationOutput(base64.b64decode(payload["b64_json"]), payload["mime_type"], payload["width"],
                            payload["height"], payload["frames"], payload["seed"], payload.get("timings", {}),
                            index=payload.get("index", 0))


def _http_message(response: Any) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def write_output(output: GenerationOutput, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(output.data)
    return path
