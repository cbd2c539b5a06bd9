"""OpenAI conformance of the HTTP bodies and responses, without a server.

Bodies: every documented OpenAI field is accepted; those that cannot apply are refused as
``Refused`` (HTTP 400, ``code``). Responses: validated by the official ``openai`` SDK's own
pydantic types, which are what a client parses.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import openai.types as oai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from services import flows
from services.config import VideoJobSettings
from services.handoff import MediaOutput
from services.http_api import (
    ERROR_CODES,
    ChatBody,
    ImageGenerationBody,
    Refused,
    VideoBody,
    chat_chunk,
    chat_completion,
    chat_request,
    completed_event,
    error_body,
    image_item,
    image_request,
    images_response,
    parse_body,
    partial_image_event,
    video_model_fields,
    video_request,
)
from services.jobs import InvalidArgument
from services.understanding import UnderstandDone
from services.video_jobs import VideoJobStore


def _png(width: int = 32, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _image(data: dict, *, edit: bool = False):
    return image_request(parse_body(ImageGenerationBody, data), edit=edit)


# ---------------------------------------------------------------------------- image bodies


def test_every_openai_image_field_is_accepted():
    body = {"prompt": "a cat", "model": "image", "n": 2, "size": "auto", "quality": "high", "background": "opaque",
            "output_format": "webp", "output_compression": 0, "response_format": "url", "stream": True,
            "partial_images": 2, "moderation": "low", "user": "u1", "safety_identifier": "s1", "style": "vivid",
            "complexity": "low", "input_fidelity": "high"}
    msg = _image(body)
    assert msg.num_images == 2 and msg.model == "image" and msg.preview  # partial images need previews
    assert not msg.HasField("width") and msg.quality == 1  # size auto: model default; compression 0 -> 1


def test_multipart_strings_convert_like_the_sdk_sends_them():
    msg = _image({"prompt": "x", "n": "3", "stream": "true", "partial_images": "1"})
    assert msg.num_images == 3 and msg.preview


def test_edit_images_as_openai_json_objects_and_data_urls():
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    msg = _image({"prompt": "blue", "images": [{"image_url": url}, base64.b64encode(_png()).decode()]}, edit=True)
    assert [m.data[:4] for m in msg.reference_images] == [b"\x89PNG"] * 2
    with pytest.raises(Refused) as info:
        _image({"prompt": "blue", "images": [{"file_id": "file-1"}]}, edit=True)
    assert info.value.field == "images[0].file_id"


@pytest.mark.parametrize("body,field", [
    ({"mask": {"image_url": "data:image/png;base64,AA=="}}, "mask"),
    ({"background": "transparent"}, "background"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "svg"}, "output_format"),
    ({"frame_count": 4}, "frame_count"),
    ({"svg": {"model": "x"}}, "svg"),
    ({"partial_images": 1}, "partial_images"),  # without stream
])
def test_inapplicable_image_values_are_refused_with_a_400_code(body, field):
    with pytest.raises(Refused) as info:
        _image({"prompt": "x", **body}, edit=True)
    assert info.value.field == field and info.value.http_status == 400 and info.value.code


@pytest.mark.parametrize("body,field", [
    ({"partial_images": 4, "stream": True}, "partial_images"),
    ({"quality": "ultra"}, "quality"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"output_compression": 101}, "output_compression"),
])
def test_bad_image_values_are_invalid_arguments_naming_the_field(body, field):
    with pytest.raises(InvalidArgument) as info:
        _image({"prompt": "x", **body})
    assert info.value.field == field and not isinstance(info.value, Refused)


# ---------------------------------------------------------------------------- video bodies


def test_video_seconds_as_openai_strings_become_4k_plus_1_frames():
    msg = video_request(parse_body(VideoBody, {"prompt": "waves", "seconds": "4", "size": "64x32", "model": "video"}))
    assert msg.frames == 65 and (msg.width, msg.height) == (64, 32) and msg.model == "video"
    with pytest.raises(InvalidArgument) as info:
        video_request(parse_body(VideoBody, {"prompt": "waves", "seconds": "four"}))
    assert info.value.field == "seconds"


def test_image_to_video_is_refused_and_a_video_reference_is_an_edit():
    with pytest.raises(Refused) as info:
        video_request(parse_body(VideoBody, {"prompt": "x", "input_reference": {"image_url": "data:,"}}))
    assert info.value.field == "input_reference"
    with pytest.raises(Refused):
        video_request(parse_body(VideoBody, {"prompt": "x"}), source=_png())
    edit = video_request(parse_body(VideoBody, {"prompt": "x"}), source=b"\x00\x00\x00\x18ftypmp42....")
    assert edit.instruction == "x" and edit.source_video.data[4:8] == b"ftyp"


# ---------------------------------------------------------------------------- chat bodies


def test_chat_developer_role_is_a_system_message_and_unused_fields_are_ignored():
    body = parse_body(ChatBody, {"model": "image", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 5, "seed": 3, "stop": "x", "n": 2, "frequency_penalty": 0.5,
        "stream_options": {"include_usage": True}, "metadata": {"a": "b"}, "store": False})
    msg = chat_request(body)
    assert [m.role for m in msg.messages] == ["system", "user"] and msg.max_tokens == 5 and msg.seed == 3
    assert list(msg.stop) == ["x"] and msg.model == "image"


@pytest.mark.parametrize("extra,field", [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
])
def test_chat_features_that_cannot_be_honoured_are_refused(extra, field):
    body = parse_body(ChatBody, {"messages": [{"role": "user", "content": "hi"}], **extra})
    with pytest.raises(Refused) as info:
        chat_request(body)
    assert info.value.field == field and info.value.http_status == 400


# ---------------------------------------------------------------------------- responses, as the SDK parses them


def _result(index: int = 0, seed: int = 5) -> flows.Result:
    return flows.Result("image-1", MediaOutput(_png(), "image/png", 32, 16), seed, "image", 2, 6, {"total": 1.0},
                        index=index)


def test_images_response_and_stream_events_parse_as_the_sdk_types():
    body = parse_body(ImageGenerationBody, {"prompt": "x", "n": 2, "stream": True, "partial_images": 1})
    results = [_result(0, 5), _result(1, 6)]
    response = oai.ImagesResponse.model_validate(images_response(results, body, [image_item(r) for r in results]))
    assert len(response.data) == 2 and response.size == "32x16" and response.usage.output_tokens == 12
    assert base64.b64decode(response.data[1].b64_json)[:4] == b"\x89PNG"
    url = images_response(results[:1], body, [image_item(results[0], "http://h/v1/images/files/img-1")])
    assert oai.ImagesResponse.model_validate(url).data[0].url.endswith("img-1")

    step = flows.Step("image-1", 1, 2, _png(), index=1)
    partial = oai.ImageGenPartialImageEvent.model_validate(partial_image_event(step, body, 0, edit=False, size="auto"))
    assert partial.type == "image_generation.partial_image" and partial.partial_image_index == 0
    done = oai.ImageEditCompletedEvent.model_validate(completed_event(results[1], body, edit=True))
    assert done.type == "image_edit.completed" and done.usage.output_tokens == 6


def test_chat_responses_parse_as_the_sdk_types():
    dones = [UnderstandDone(7, 3, "length"), UnderstandDone(7, 2, "stop")]
    completion = ChatCompletion.model_validate(chat_completion("chat-1", 1, "image", ["abc", "de"], dones))
    assert [c.finish_reason for c in completion.choices] == ["length", "stop"]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        7, 5, 12)
    line = chat_chunk("chat-1", 1, "image", [], {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    chunk = ChatCompletionChunk.model_validate(json.loads(line.removeprefix("data: ")))
    assert chunk.choices == [] and chunk.usage.total_tokens == 3


def test_error_body_is_the_openai_shape():
    error = error_body("model: unknown", "invalid_request_error", "model", "model_not_found")["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found"
    assert ERROR_CODES[429] == "rate_limit_exceeded"


# ---------------------------------------------------------------------------- the video job store


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock) -> VideoJobStore:
    return VideoJobStore(VideoJobSettings(max_jobs=10, max_running=10, max_bytes=100, result_ttl_s=60),
                         deadline_s=30, clock=clock)


def _video(obj: dict) -> oai.Video:
    """Strictly validated, but for ``size``: the SDK's type lists only Sora's four sizes (its client
    does not validate responses, so any WIDTHxHEIGHT reaches the caller)."""
    assert obj["size"] in ("", "64x32")
    return oai.Video.model_validate({**obj, "size": "720x1280"})


def test_video_objects_parse_as_the_sdk_type_through_their_lifecycle():
    clock = Clock()
    store = _store(clock)
    meta = video_model_fields(model="video", width=64, height=32, frames=9, fps=16, prompt="waves")
    assert store.create("v1", meta)["size"] == "64x32"
    queued = _video(store.get("v1"))
    assert (queued.status, queued.model, queued.seconds) == ("queued", "video", "0.5625")
    assert queued.completed_at is None and queued.expires_at is None
    clock.now += 5
    done = _video(store.finish("v1", {"seed": 1}, b"mp4", "video/mp4"))
    assert done.status == "completed" and done.completed_at == 1005 and done.expires_at == 1065
    store.create("v2", meta)
    failed = _video(store.fail("v2", {"message": "boom", "type": "server_error"}))
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message == "boom"


def test_video_list_pages_by_creation_time_and_delete_forgets():
    clock = Clock()
    store = _store(clock)
    for i in range(5):
        store.create(f"v{i}")
        clock.now += 1
    page = store.list(limit=2)
    assert [v["id"] for v in page["data"]] == ["v4", "v3"] and page["has_more"] and page["last_id"] == "v3"
    rest = store.list(after="v3", limit=10)
    assert [v["id"] for v in rest["data"]] == ["v2", "v1", "v0"] and not rest["has_more"]
    assert [v["id"] for v in store.list(order="asc", limit=1)["data"]] == ["v0"]
    store.finish("v1", {}, b"x" * 10, "video/mp4")
    assert store.delete("v1") and store.get("v1") is None and not store.delete("v1")
    assert store.counts()["bytes"] == 0
    assert store.delete("v2") and store.progress("v2", 10) is False  # its replica stops it


def test_image_files_expire_and_share_the_byte_bound():
    clock = Clock()
    store = _store(clock)
    assert store.put_file("img-1", b"x" * 60, "image/png", ttl_s=10) == 1010
    assert store.file("img-1") == (b"x" * 60, "image/png")
    from services.errors import Busy

    with pytest.raises(Busy):
        store.put_file("img-2", b"y" * 50, "image/png", ttl_s=10)
    clock.now += 11
    assert store.file("img-1") is None and store.counts()["bytes"] == 0


# ---------------------------------------------------------------------------- several images per prompt


def test_preview_steps_spread_partial_images_over_the_steps():
    assert flows.preview_steps(10, 3) == {2, 5, 8} and flows.preview_steps(2, 3) == {1, 2}
    assert flows.preview_steps(10, 0) == frozenset()


def test_merge_streams_interleaves_and_an_error_cancels_the_rest():
    async def slow(tag: str, n: int, delay: float):
        for i in range(n):
            await asyncio.sleep(delay)
            yield f"{tag}{i}"

    cancelled = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield "e"
        finally:
            cancelled.append(True)

    async def failing():
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")
        yield  # pragma: no cover

    async def run():
        got = [item async for item in flows.merge_streams([slow("a", 3, 0.01), slow("b", 2, 0.015)])]
        assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]
        assert [v for i, v in got if i == 0] == ["a0", "a1", "a2"]  # each stream keeps its order
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in flows.merge_streams([endless(), failing()]):
                pass
        await asyncio.sleep(0)
        assert cancelled == [True]

    asyncio.run(run())


def test_image_jobs_get_consecutive_seeds_and_own_stage_ids():
    from protos import generation_pb2
    from services.config import RequestLimits
    from services.families import get_family
    from services.jobs import image_job

    family = get_family("mammoth2")
    job = image_job(generation_pb2.GenerateImageRequest(prompt="x", seed=7), dict(family.defaults), RequestLimits(),
                    edit=False)
    jobs = flows.image_jobs(job, 3)
    assert [j.seed for j in jobs] == [7, 8, 9] and len({j.request_id for j in jobs}) == 3
    assert jobs[1].request_id.startswith(job.request_id)
