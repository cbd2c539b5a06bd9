"""Request resolution without a cluster: defaults, limits, field-named errors, HTTP mapping."""

from __future__ import annotations

import base64
import pickle

import grpc
import pytest

from protos import common_pb2, generation_pb2
from services.config import RequestLimits
from services.errors import classify
from services.http_api import (
    ChatBody,
    ImageGenerationBody,
    VideoBody,
    chat_request,
    http_message,
    image_request,
    video_request,
)
from services.jobs import InvalidArgument, image_job, understand_job, video_job
from services.presets import get_preset

IMAGE = get_preset("tiny-mammoth2").defaults
VIDEO = get_preset("tiny-mammoth25").defaults
LIMITS = RequestLimits(max_width=512, max_height=512, max_frames=17, max_steps=40, max_reference_images=2)


def test_image_defaults_fill_unset_fields_and_seed_is_drawn():
    job = image_job(generation_pb2.GenerateImageRequest(prompt="a cat"), IMAGE, LIMITS, edit=False)
    assert (job.width, job.height, job.steps) == (IMAGE["width"], IMAGE["height"], IMAGE["steps"])
    assert (job.ar_height, job.ar_width) == (IMAGE["ar_height"], IMAGE["ar_width"])
    assert job.text_guidance == IMAGE["text_guidance"] and job.image_guidance == 1.0
    assert job.negative_prompt == IMAGE["negative_prompt"] and 0 <= job.seed < 2**31
    assert (job.latent_height, job.latent_width) == (IMAGE["height"] // 8, IMAGE["width"] // 8)
    assert job.planned_tokens == IMAGE["ar_height"] * (IMAGE["ar_width"] + 1)


def test_explicit_zero_values_are_kept_not_defaulted():
    msg = generation_pb2.GenerateImageRequest(prompt="x", seed=0, text_guidance=0.0, ar_top_p=0.0, negative_prompt="")
    job = image_job(msg, IMAGE, LIMITS, edit=False)
    assert job.seed == 0 and job.text_guidance == 0.0 and job.ar_top_p == 0.0 and job.negative_prompt is None


@pytest.mark.parametrize("fields,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "x", "width": 100, "height": 64}, "width"),
    ({"prompt": "x", "width": 64}, "height"),
    ({"prompt": "x", "width": 1024, "height": 64}, "width"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 41}, "steps"),
    ({"prompt": "x", "text_guidance": float("nan")}, "text_guidance"),
    ({"prompt": "x", "text_guidance": float("inf")}, "text_guidance"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "ar_height": 0}, "ar_height"),
    ({"prompt": "x", "quality": 0}, "quality"),
    ({"prompt": "x", "cfg_range": common_pb2.CfgRange(start=0.8, end=0.2)}, "cfg_range"),
    ({"prompt": "bad\x00byte"}, "prompt"),
])
def test_bad_image_requests_name_the_field(fields, field):
    with pytest.raises(InvalidArgument) as info:
        image_job(generation_pb2.GenerateImageRequest(**fields), IMAGE, LIMITS, edit=False)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_edit_requires_images_within_limits():
    with pytest.raises(InvalidArgument, match="reference_images"):
        image_job(generation_pb2.EditImageRequest(instruction="x"), IMAGE, LIMITS, edit=True)
    many = generation_pb2.EditImageRequest(instruction="x", reference_images=[common_pb2.Media(data=b"x")] * 3)
    with pytest.raises(InvalidArgument, match="exceed the limit 2"):
        image_job(many, IMAGE, LIMITS, edit=True)
    empty = generation_pb2.EditImageRequest(instruction="x", reference_images=[common_pb2.Media(data=b"")])
    with pytest.raises(InvalidArgument, match=r"reference_images\[0\]: is empty"):
        image_job(empty, IMAGE, LIMITS, edit=True)
    job = image_job(generation_pb2.EditImageRequest(instruction="x", reference_images=[common_pb2.Media(data=b"1")]),
                    IMAGE, LIMITS, edit=True)
    assert job.size_from_reference and job.image_guidance == IMAGE["image_guidance"]


def test_an_edit_with_no_size_fits_the_default_area_clamped_to_the_limits():
    """An official checkpoint's 1024x1024 default on a server capped at 256: the reference picks the
    size within 256x256, where the default itself would be refused."""
    official = {**IMAGE, "width": 1024, "height": 1024}
    capped = RequestLimits(max_width=256, max_height=256)
    edit = generation_pb2.EditImageRequest(instruction="x", reference_images=[common_pb2.Media(data=b"1")])
    job = image_job(edit, official, capped, edit=True)
    assert job.size_from_reference and (job.width, job.height) == (256, 256)
    with pytest.raises(InvalidArgument, match="width"):  # a request that asks for it is still refused
        image_job(generation_pb2.GenerateImageRequest(prompt="x"), official, capped, edit=False)


@pytest.mark.parametrize("frames,ok", [(1, True), (5, True), (17, True), (6, False), (21, False), (0, False)])
def test_video_frames_must_be_4k_plus_1_within_the_limit(frames, ok):
    msg = generation_pb2.GenerateVideoRequest(prompt="x", frames=frames)
    if ok:
        job = video_job(msg, VIDEO, LIMITS, edit=False)
        assert job.latent_frames == (frames - 1) // 4 + 1
    else:
        with pytest.raises(InvalidArgument, match="frames"):
            video_job(msg, VIDEO, LIMITS, edit=False)


def test_understand_validates_roles_parts_and_sampling():
    msg = generation_pb2.UnderstandRequest(max_tokens=4)
    with pytest.raises(InvalidArgument, match="messages"):
        understand_job(msg, LIMITS)
    msg.messages.add(role="robot").content.add(text="hi")
    with pytest.raises(InvalidArgument, match=r"messages\[0\].role"):
        understand_job(msg, LIMITS)
    msg.messages[0].role = "user"
    msg.temperature = float("nan")
    with pytest.raises(InvalidArgument, match="temperature"):
        understand_job(msg, LIMITS)
    msg.temperature = 0.5
    job = understand_job(msg, LIMITS)
    assert job.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] and job.max_tokens == 4
    msg.stop.extend(["\n\n", " "])  # whitespace-only stop sequences are real ones
    assert understand_job(msg, LIMITS).stop == ["\n\n", " "]
    msg.stop.append("")
    with pytest.raises(InvalidArgument, match=r"stop\[2\]"):
        understand_job(msg, LIMITS)


def test_http_bodies_become_the_same_protos():
    body = ImageGenerationBody(prompt="a dog", size="128x64", guidance_scale=3.0, seed=5, output_format="webp")
    msg = image_request(body, edit=False)
    assert (msg.width, msg.height, msg.text_guidance, msg.seed) == (128, 64, 3.0, 5)
    assert msg.format == common_pb2.IMAGE_FORMAT_WEBP
    edit = image_request(ImageGenerationBody(prompt="x", images=["data:image/png;base64," +
                                                                  base64.b64encode(b"png").decode()]), edit=True)
    assert edit.reference_images[0].data == b"png"
    video = video_request(VideoBody(prompt="x", seconds=1.0, fps=8))
    assert video.frames == 9 and isinstance(video, generation_pb2.GenerateVideoRequest)
    chat = chat_request(ChatBody(messages=[{"role": "user", "content": "hello"}], max_tokens=3, stop="."))
    assert chat.messages[0].content[0].text == "hello" and chat.max_tokens == 3 and list(chat.stop) == ["."]


@pytest.mark.parametrize("body,field", [
    (ImageGenerationBody(prompt="x", size="big"), "size"),
    (ImageGenerationBody(prompt="x", images=["https://example.com/a.png"]), "images[0]"),
    (ImageGenerationBody(prompt="x", images=["!!notbase64!!"]), "images[0]"),
])
def test_http_conversion_errors_name_the_http_field(body, field):
    with pytest.raises(InvalidArgument) as info:
        image_request(body, edit=True)
    assert info.value.field == field


def test_http_messages_use_http_field_names():
    assert http_message("text_guidance: must be finite") == "guidance_scale: must be finite"
    assert http_message("reference_images[0]: corrupt") == "images[0]: corrupt"
    assert http_message("plain message without field") == "plain message without field"


def test_errors_cross_process_boundaries_and_map_to_statuses():
    error = pickle.loads(pickle.dumps(InvalidArgument("width", "bad")))
    assert error.field == "width" and classify(error).grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert classify(error).http_status == 422
    assert classify(TimeoutError()).grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    internal = classify(RuntimeError("secret stack detail"), request_id="r1")
    assert internal.http_status == 500 and "secret" not in internal.message and "r1" in internal.message
    from ray.serve.exceptions import BackPressureError

    assert classify(BackPressureError(num_queued_requests=3, max_queued_requests=2)).http_status == 429
