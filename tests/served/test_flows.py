"""End to end through real Ray Serve on CPU: the tiny image and video models, gRPC and HTTP,
every flow, against the package's one served pipeline, over the network like a client would.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import (
    common_pb2,
    dit_pb2,
    dit_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from protos.tensors import ndarray_from_proto, tensor_to_proto
from services.client import ClientError, MammothClient
from services.config import ServeConfig
from tests.served.pipeline import API_KEY, channel

pytestmark = pytest.mark.slow


def _channel(cfg: ServeConfig, app: str) -> grpc.Channel:
    return channel(cfg, app)


@pytest.fixture
def grpc_stub(served):
    ch = channel(served)
    yield generation_pb2_grpc.GenerationStub(ch)
    ch.close()


def _client(cfg: ServeConfig, *, use_http: bool = False, api_key: str | None = API_KEY) -> MammothClient:
    return MammothClient(f"127.0.0.1:{cfg.ingress.grpc_port}", f"http://127.0.0.1:{cfg.ingress.http_port}",
                         use_http=use_http, api_key=api_key)


def _png(width: int = 96, height: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---------------------------------------------------------------------------- generation flows


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_text_to_image_streams_progress_then_the_image(served, use_http):
    client = _client(served, use_http=use_http)
    steps_seen: list[tuple[int, int]] = []
    output = client.generate_image("a red bicycle", seed=7, steps=3, width=128, height=96,
                                   progress=lambda phase, s, t: steps_seen.append((s, t)) if phase == "denoise" else None)
    assert output.mime_type == "image/png" and _image_size(output.data) == (128, 96)
    assert [s for s, _ in steps_seen] == [1, 2, 3] and all(t == 3 for _, t in steps_seen)
    assert output.seed == 7 and {"dit", "vae_decode", "total"} <= set(output.timings)
    if not use_http:
        assert output.events[:2] == ["queued", "planning"] and output.events[-2:] == ["decoding", "result"]


def test_same_seed_same_image_across_transports(served):
    grpc_out = _client(served).generate_image("a lighthouse", seed=11, steps=2, width=64, height=64)
    http_out = _client(served, use_http=True).generate_image("a lighthouse", seed=11, steps=2, width=64, height=64)
    assert grpc_out.data == http_out.data


def test_image_preview_events_carry_pngs(grpc_stub):
    request = generation_pb2.GenerateImageRequest(prompt="a tree", seed=1, steps=2, width=64, height=64, preview=True)
    previews = [e.denoise_step.preview for e in grpc_stub.GenerateImage(request) if e.HasField("denoise_step")]
    assert len(previews) == 2 and all(p.mime_type == "image/png" and p.data[:8] == b"\x89PNG\r\n\x1a\n"
                                      for p in previews)


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_edit_image_takes_the_first_reference_size(served, use_http):
    references = [_png(96, 64), _png(48, 80)]  # the second is fitted to the first one's size
    output = _client(served, use_http=use_http).edit_image(references, "make it blue", seed=3, steps=2)
    assert _image_size(output.data) == (96, 64)


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_text_to_video_and_video_edit(served, use_http):
    client = _client(served, use_http=use_http)
    video = client.generate_video("waves on a beach", seed=5, steps=2, frames=5, width=64, height=64)
    assert video.mime_type == "video/mp4" and video.frames == 5 and (video.width, video.height) == (64, 64)
    edited = client.edit_video(video.data, "make it night", seed=6, steps=2)
    assert edited.frames == 5 and (edited.width, edited.height) == (64, 64)


def test_http_video_job_lifecycle(http):
    created = http.post("/v1/videos", json={"prompt": "a bird", "frames": 5, "size": "64x64", "steps": 2, "seed": 1})
    assert created.status_code == 200, created.text
    video_id = created.json()["id"]
    assert created.json()["status"] in ("queued", "in_progress")
    early = http.get(f"/v1/videos/{video_id}/content")
    assert early.status_code in (200, 409)
    deadline = time.monotonic() + 120
    while (state := http.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state["status"] == "completed" and state["frames"] == 5
    content = http.get(f"/v1/videos/{video_id}/content")
    assert content.headers["content-type"] == "video/mp4" and content.content[4:8] == b"ftyp"
    assert http.get("/v1/videos/video-unknown").status_code == 404


@pytest.mark.parametrize("use_http", [False, True], ids=["grpc", "http"])
def test_understand_streams_an_answer_about_an_image(served, use_http):
    deltas = list(_client(served, use_http=use_http).ask("What is in this picture?", [("image", _png())],
                                                         max_tokens=8, seed=1))
    assert len(deltas) >= 2 and "".join(deltas)


def test_http_image_progress_over_sse(http):
    with http.stream("POST", "/v1/images/generations",
                     json={"prompt": "a cat", "steps": 2, "size": "64x64", "stream": True,
                           "progress_events": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds.count("denoise_step") == 2 and kinds[-1] == "image_generation.completed"
    assert _image_size(base64.b64decode(events[-1]["b64_json"])) == (64, 64)


def test_concurrent_requests_all_complete_and_batch(served):
    from ray import serve

    client = _client(served)
    prompts = [f"a house number {i}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda p: client.generate_image(p, seed=1, steps=3, width=64, height=64), prompts))
    assert all(_image_size(o.data) == (64, 64) for o in outputs)
    assert len({o.data for o in outputs}) == 4  # different prompts, different images
    stats = serve.get_deployment_handle("DiT", app_name="image-dit").stats.remote().result()
    assert stats["batches_run"] >= 1


def _wait_until_dit_idle(app: str, why: str) -> None:
    from ray import serve

    dit = serve.get_deployment_handle("DiT", app_name=app)
    deadline = time.monotonic() + 30
    while dit.stats.remote().result()["active_requests"]:
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def _step_timing(grpc_stub, request, steps_to_see: int = 5) -> tuple[float, float]:
    """Seconds to the first denoise step and per step, measured by cancelling after a few steps."""
    call, start, stamps = grpc_stub.GenerateImage(request), time.monotonic(), []
    for event in call:
        if event.HasField("denoise_step"):
            stamps.append(time.monotonic() - start)
            if len(stamps) == steps_to_see:
                call.cancel()
                break
    return stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def test_cancel_mid_denoise_frees_the_dit(served, grpc_stub):
    request = generation_pb2.GenerateImageRequest(prompt="slow", seed=1, steps=40, width=256, height=256)
    call = grpc_stub.GenerateImage(request)
    for event in call:
        if event.HasField("denoise_step"):
            call.cancel()
            break
    _wait_until_dit_idle("image-dit", "the cancelled request kept the DiT busy")
    # ...and the DiT serves the next request.
    assert _client(served).generate_image("next", seed=2, steps=1, width=64, height=64).width == 64


def test_deadline_is_enforced_and_frees_the_dit(served, grpc_stub):
    # The deadline must land mid-denoise whatever this machine's speed: measure it first.
    request = generation_pb2.GenerateImageRequest(prompt="slow", seed=1, steps=100, width=512, height=512)
    first_step_s, step_s = _step_timing(grpc_stub, request)
    _wait_until_dit_idle("image-dit", "the cancelled request kept the DiT busy")
    timeout = first_step_s + max(1.0, 0.4 * request.steps * step_s)  # the whole run needs ~2.5x that
    with pytest.raises(grpc.RpcError) as info:
        list(grpc_stub.GenerateImage(request, timeout=timeout))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until_dit_idle("image-dit", "the timed-out request kept the DiT busy")


def test_stage_services_answer_grpc_clients_directly(served):
    """Plan only, denoise only, decode only: each stage app serves its own gRPC service."""
    planner = planner_pb2_grpc.PlannerStub(_channel(served, "image-planner"))
    plan = planner.PlanImage(planner_pb2.PlanImageRequest(prompt="a cat", seed=1, ar_height=2, ar_width=2))
    text = ndarray_from_proto(plan.text_condition, name="text_condition")
    assert plan.planned_tokens == 2 * 3 and text.ndim == 2 and text.shape[1] == 128
    encoded = planner.EncodePrompt(planner_pb2.EncodePromptRequest(prompt="a cat", negative_prompt="blurry"))
    negative = ndarray_from_proto(encoded.negative_hidden_states, name="negative_hidden_states")
    assert encoded.num_tokens > 0 and negative.shape[0] > 0 and negative.shape[1] == encoded.hidden_states.shape[1]

    dit = dit_pb2_grpc.DiTStub(_channel(served, "image-dit"))
    request = dit_pb2.DenoiseRequest(latent_height=8, latent_width=8, steps=2, seed=3, text_guidance=1.0)
    request.text_condition.CopyFrom(plan.text_condition)
    request.image_condition.CopyFrom(plan.image_condition)
    events = list(dit.Denoise(request))
    assert [e.step.step for e in events[:-1]] == [1, 2] and events[-1].HasField("result")
    latents = ndarray_from_proto(events[-1].result.latents, name="latents")
    assert latents.shape == (16, 8, 8)

    vae = vae_pb2_grpc.VAEStub(_channel(served, "image-vae"))
    decode = vae_pb2.DecodeRequest(image_format=common_pb2.IMAGE_FORMAT_PNG)
    tensor_to_proto(latents, out=decode.latents)
    image = vae.Decode(decode)
    assert (image.width, image.height) == (64, 64) and _image_size(image.media.data) == (64, 64)
    again = vae.Encode(vae_pb2.EncodeRequest(media=image.media, width=64, height=64))
    assert ndarray_from_proto(again.latents, name="latents").shape == (16, 8, 8) and again.width == 64
    preview = vae.Preview(vae_pb2.PreviewRequest(format=common_pb2.IMAGE_FORMAT_JPEG, max_side=4,
                                                 latents=events[-1].result.latents))
    assert preview.mime_type == "image/jpeg" and _image_size(preview.data) == (4, 4)
    with pytest.raises(grpc.RpcError) as info:
        vae.Decode(vae_pb2.DecodeRequest(latents=common_pb2.Tensor(dtype="float32", shape=[16, 8, 8], data=b"x")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "latents" in info.value.details()


# ---------------------------------------------------------------------------- bad input


BAD_GRPC = [
    ("GenerateImage", generation_pb2.GenerateImageRequest(prompt=""), "prompt"),
    ("GenerateImage", generation_pb2.GenerateImageRequest(prompt="x", width=100, height=64), "width"),
    ("GenerateImage", generation_pb2.GenerateImageRequest(prompt="x", width=4096, height=64), "width"),
    ("GenerateImage", generation_pb2.GenerateImageRequest(prompt="x", text_guidance=float("nan")), "text_guidance"),
    ("GenerateImage", generation_pb2.GenerateImageRequest(prompt="x", steps=0), "steps"),
    ("EditImage", generation_pb2.EditImageRequest(instruction="x", reference_images=[
        common_pb2.Media(data=b"GIF89a not really a gif")]), "reference_images[0]"),
    ("EditImage", generation_pb2.EditImageRequest(instruction="x", reference_images=[
        common_pb2.Media(data=b"%PDF-1.4 this is a pdf")]), "reference_images[0]"),
    ("GenerateVideo", generation_pb2.GenerateVideoRequest(prompt="x", frames=33), "frames"),
    ("GenerateVideo", generation_pb2.GenerateVideoRequest(prompt="x", frames=6), "frames"),
    ("EditVideo", generation_pb2.EditVideoRequest(instruction="x", source_video=common_pb2.Media(
        data=b"\x00\x00\x00\x18ftypmp42 truncated")), "source_video"),
]


@pytest.mark.parametrize("method,request_msg,field", BAD_GRPC, ids=[f"{m}-{f}" for m, _, f in BAD_GRPC])
def test_bad_grpc_input_is_invalid_argument_naming_the_field(grpc_stub, method, request_msg, field):
    with pytest.raises(grpc.RpcError) as info:
        list(getattr(grpc_stub, method)(request_msg))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert "Traceback" not in info.value.details()


@pytest.mark.parametrize("path,body,field", [
    ("/v1/images/generations", {"prompt": ""}, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "size": "100x64"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": "NaN"}, "guidance_scale"),
    ("/v1/images/generations", {"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ("/v1/images/edits", {"prompt": "x", "images": ["bm90IGFuIGltYWdl"]}, "images[0]"),
    ("/v1/videos", {"prompt": "x", "frames": 33}, "frames"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages[0]"),
])
def test_bad_http_input_is_422_naming_the_field(http, path, body, field):
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"].startswith(field) or (error["param"] or "").startswith(field), error


def test_server_still_serves_after_bad_input(served, grpc_stub):
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            list(grpc_stub.GenerateImage(generation_pb2.GenerateImageRequest(prompt="")))
    assert _client(served).generate_image("fine", seed=1, steps=1, width=64, height=64).width == 64


# ---------------------------------------------------------------------------- auth


def test_auth_off_then_on(served):
    from ray import serve

    from services.apps.pipeline import app as ingress_app
    from services.config import ServeConfig

    with pytest.raises(ClientError) as info:  # the package's pipeline runs with keys
        _client(served, api_key=None).generate_image("x", seed=1, steps=1, width=64, height=64)
    assert info.value.code == "UNAUTHENTICATED"
    with pytest.raises(ClientError) as info:
        _client(served, use_http=True, api_key="wrong").generate_image("x", seed=1, steps=1, width=64, height=64)
    assert info.value.code == 401
    open_cfg = ServeConfig.from_dict({**served.to_dict(), "ingress": {
        **served.to_dict()["ingress"], "auth_enabled": False, "api_keys": []}})
    serve.run(ingress_app({"config": open_cfg.to_dict()}), name="mammoth", route_prefix="/")
    try:
        assert _client(served, api_key=None).generate_image("x", seed=1, steps=1, width=64, height=64).width == 64
        assert _client(served, use_http=True, api_key=None).generate_image(
            "x", seed=1, steps=1, width=64, height=64).width == 64
    finally:
        serve.run(ingress_app({"config": served.to_dict()}), name="mammoth", route_prefix="/")
    with pytest.raises(ClientError) as info:
        _client(served, use_http=True, api_key=None).generate_image("x", seed=1, steps=1, width=64, height=64)
    assert info.value.code == 401
    assert _client(served).generate_image("x", seed=1, steps=1, width=64, height=64).width == 64
