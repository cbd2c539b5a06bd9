"""OpenAI conformance through the official ``openai`` Python SDK, against the package's one served
pipeline (real vLLM planners, DiTs, VAEs behind Ray Serve, API keys on): every test is what a new
user with the OpenAI client would do. The gRPC side is checked the way grpcurl would: a
reflection listing of the services and a health probe.
"""

from __future__ import annotations

import base64
import io
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from protos import generation_pb2, generation_pb2_grpc
from tests.served.pipeline import API_KEY

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # videos.* (Sora)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served.ingress.http_port}/v1", api_key=API_KEY,
                       timeout=300, max_retries=0) as sdk:
        yield sdk


def _png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


FAST = {"steps": 2}  # Mammoth's own fields ride in extra_body, as the SDK intends


# ---------------------------------------------------------------------------- models


def test_models_list_names_the_served_models(client):
    ids = {m.id for m in client.models.list()}
    assert {"image", "video"} <= ids


def test_unknown_model_is_openai_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(prompt="x", model="gpt-image-1", size="64x64", extra_body=FAST)
    assert info.value.code == "model_not_found" and info.value.body["param"] == "model"


# ---------------------------------------------------------------------------- images


def test_images_generate_n2_gives_two_images_with_consecutive_seeds(client):
    response = client.images.generate(prompt="a red bicycle", n=2, size="64x64", output_format="png",
                                      quality="low", moderation="low", user="u-1", extra_body={**FAST, "seed": 11})
    images = [base64.b64decode(item.b64_json) for item in response.data]
    assert len(images) == 2 and all(_size(d) == (64, 64) for d in images) and images[0] != images[1]
    assert response.size == "64x64" and response.output_format == "png" and response.usage.output_tokens > 0
    assert response.model_extra["seeds"] == [11, 12]  # image i: seed + i (batched, so not bit-equal to alone)


def test_images_generate_streams_openai_partial_and_completed_events(client):
    stream = client.images.generate(prompt="a lighthouse", size="64x64", stream=True, partial_images=2,
                                    extra_body={"steps": 4, "seed": 1})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert base64.b64decode(events[0].b64_json)[:4] == b"\x89PNG"
    assert _size(base64.b64decode(events[-1].b64_json)) == (64, 64) and events[-1].usage.output_tokens > 0


def test_response_format_url_is_served_by_the_ingress_behind_the_key(client, served):
    response = client.images.generate(prompt="a tree", size="64x64", response_format="url", extra_body=FAST)
    url = response.data[0].url
    assert url and response.data[0].b64_json is None
    assert httpx.get(url, timeout=30).status_code == 401  # auth applies
    fetched = httpx.get(url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert fetched.status_code == 200 and _size(fetched.content) == (64, 64)


def test_images_edit_multipart_single_and_list_and_mask_refused(client):
    edited = client.images.edit(image=("in.png", _png(64, 48), "image/png"), prompt="make it blue", n=1,
                                extra_body={**FAST, "seed": 2})
    assert _size(base64.b64decode(edited.data[0].b64_json)) == (64, 48)  # the first image's size
    two = client.images.edit(image=[("a.png", _png(64, 48), "image/png"), ("b.png", _png(32, 32, 1), "image/png")],
                             prompt="combine", size="64x64", extra_body=FAST)
    assert _size(base64.b64decode(two.data[0].b64_json)) == (64, 64)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", _png(), "image/png"), mask=("m.png", _png(), "image/png"),
                           prompt="x", extra_body=FAST)
    assert info.value.status_code == 400 and info.value.body["param"] == "mask" and info.value.code


# ---------------------------------------------------------------------------- chat


def _ask(kind: str = "text") -> list[dict]:
    content: list[dict] = [{"type": "text", "text": "What is in this picture?"}]
    if kind == "image":
        url = "data:image/png;base64," + base64.b64encode(_png()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": content}]


def test_chat_completion_usage_length_and_n(client):
    response = client.chat.completions.create(model="image", messages=_ask("image"), max_completion_tokens=4,
                                              seed=1, n=2, temperature=0.0, stop=["\n\n\n\n"])
    assert len(response.choices) == 2 and all(c.message.content for c in response.choices)
    assert [c.finish_reason for c in response.choices] == ["length", "length"]  # cut by the token bound
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8 and response.model == "image"


def test_chat_stream_with_include_usage(client):
    stream = client.chat.completions.create(model="image", messages=_ask(), max_tokens=5, seed=1, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


# ---------------------------------------------------------------------------- videos


def _wait(client, video_id: str):
    deadline = time.monotonic() + 240
    while (video := client.videos.retrieve(video_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, video
        time.sleep(0.3)
    return video


def test_videos_create_retrieve_list_download_delete(client):
    created = client.videos.create(prompt="waves on a beach", size="64x64",
                                   extra_body={"frames": 5, "steps": 2, "seed": 3})
    assert created.object == "video" and created.status in ("queued", "in_progress")
    assert created.model == "video" and created.size == "64x64" and created.seconds
    video = _wait(client, created.id)
    assert video.status == "completed" and video.progress == 100, video
    assert video.completed_at >= video.created_at and video.expires_at > video.completed_at
    listed = client.videos.list(limit=50, order="desc")
    assert created.id in [v.id for v in listed.data]
    content = client.videos.download_content(created.id)
    mp4 = content.read()
    assert mp4[4:8] == b"ftyp"
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.download_content(created.id, variant="thumbnail")
    assert info.value.body["param"] == "variant"

    edit = client.videos.create(prompt="make it night", input_reference=("in.mp4", mp4, "video/mp4"),
                                extra_body={"steps": 2, "seed": 4})
    edited = _wait(client, edit.id)
    assert edited.status == "completed" and edited.size == "64x64", edited
    with pytest.raises(openai.BadRequestError) as info:  # image-to-video: no start-frame input
        client.videos.create(prompt="x", input_reference=("start.png", _png(), "image/png"))
    assert info.value.body["param"] == "input_reference"
    # the same as a reference object: JSON, and multipart flattened the way newer SDKs send it
    with httpx.Client(base_url=str(client.base_url), headers={"authorization": f"Bearer {API_KEY}"}) as raw:
        as_json = raw.post("videos", json={"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,AAAA"}})
        as_form = raw.post("videos", data={"prompt": "x", "input_reference[image_url]": "data:image/png;base64,AAAA"},
                           files={"unused": ("a.txt", b"", "text/plain")})
    for refused in (as_json, as_form):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_reference", refused.text

    deleted = client.videos.delete(created.id)
    assert deleted.deleted and deleted.id == created.id and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)


def test_list_pages_with_after(client):
    ids = [client.videos.create(prompt=f"clip {i}", size="64x64", extra_body={"frames": 1, "steps": 1}).id
           for i in range(2)]
    for video_id in ids:
        _wait(client, video_id)
    first = client.videos.list(limit=1, order="desc")
    assert first.data[0].id == ids[-1] and first.has_more
    second = client.videos.list(limit=1, order="desc", after=first.data[0].id)
    assert second.data[0].id == ids[-2]


# ---------------------------------------------------------------------------- gRPC: reflection, health, num_images


def _metadata() -> list[tuple[str, str]]:
    return [("application", "mammoth"), ("authorization", f"Bearer {API_KEY}")]


def test_grpc_reflection_lists_the_services_and_health_answers(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.ingress.grpc_port}") as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  metadata=_metadata())
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert {"mammoth.v1.Generation", "grpc.health.v1.Health"} <= names, names
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="mammoth.v1.Generation"),
                              metadata=[("application", "mammoth")])
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_num_images_streams_one_result_per_image(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.ingress.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateImageRequest(prompt="a house", seed=5, steps=2, width=64, height=64,
                                                      num_images=3)
        events = list(stub.GenerateImage(request, metadata=_metadata()))
        results = [e.result for e in events if e.HasField("result")]
        assert sorted(r.index for r in results) == [0, 1, 2] and sorted(r.seed for r in results) == [5, 6, 7]
        assert len({e.request_id for e in events}) == 1
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GenerateImage(generation_pb2.GenerateImageRequest(prompt="x", num_images=4),
                                    metadata=_metadata()))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_images" in info.value.details()
