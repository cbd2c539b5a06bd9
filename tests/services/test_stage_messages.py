"""The stage request messages the pipeline sends: a job survives the trip to each stage."""

from __future__ import annotations

import pickle

import pytest

from protos import common_pb2, dit_pb2, generation_pb2, planner_pb2, vae_pb2
from services import stage_messages as messages
from services.config import RequestLimits
from services.jobs import InvalidArgument, image_job, understand_job, video_job
from services.presets import get_preset

IMAGE = get_preset("tiny-mammoth2").defaults
VIDEO = {**get_preset("tiny-mammoth25").defaults, "vae_spatial_compression": 16}  # Wan2.2-like geometry
LIMITS = RequestLimits(max_width=512, max_height=512, max_frames=17, max_steps=40, max_reference_images=2)
PNG = b"\x89PNG not decoded here"


def _edit_job(**fields):
    msg = generation_pb2.EditImageRequest(
        instruction="make it blue", reference_images=[common_pb2.Media(data=PNG), common_pb2.Media(data=b"2")],
        seed=7, ar_height=3, ar_width=4, ar_cfg_scale=2.5, ar_temperature=0.5, ar_top_k=9, ar_top_p=0.75,
        text_guidance=6.0, image_guidance=1.5, steps=12, format=common_pb2.IMAGE_FORMAT_WEBP, quality=70,
        resize_policy=common_pb2.RESIZE_POLICY_PAD, **fields)
    return image_job(msg, IMAGE, LIMITS, edit=True)


def _video_job(edit: bool = False, **fields):
    cls = generation_pb2.EditVideoRequest if edit else generation_pb2.GenerateVideoRequest
    text = {"instruction": "snow"} if edit else {"prompt": "snow"}
    source = {"source_video": common_pb2.Media(data=b"mp4")} if edit else {}
    msg = cls(**text, **source, seed=3, steps=5, guidance=4.0, fps=12, width=128, height=64,
              cfg_range=common_pb2.CfgRange(start=0.25, end=0.75), **fields)
    return video_job(msg, VIDEO, LIMITS, edit=edit)


def test_planner_gets_every_planning_field():
    job = _edit_job(negative_prompt="blurry")
    request = messages.plan_image_request(job)
    assert not request.reference_images  # the fitted pixels travel beside the message
    again = messages.plan_image_job(pickle.loads(pickle.dumps(request)), IMAGE, LIMITS)
    for name in ("request_id", "prompt", "negative_prompt", "seed", "ar_height", "ar_width", "ar_cfg_scale",
                 "ar_temperature", "ar_top_k", "ar_top_p"):
        assert getattr(again, name) == getattr(job, name), name


def test_no_negative_prompt_stays_none_instead_of_the_model_default():
    job = image_job(generation_pb2.GenerateImageRequest(prompt="x", negative_prompt=""), IMAGE, LIMITS, edit=False)
    assert job.negative_prompt is None
    assert messages.plan_image_job(messages.plan_image_request(job), IMAGE, LIMITS).negative_prompt is None


def test_a_direct_plan_request_takes_model_defaults_and_limits():
    job = messages.plan_image_job(planner_pb2.PlanImageRequest(prompt="a cat"), IMAGE, LIMITS)
    assert (job.ar_height, job.ar_width) == (IMAGE["ar_height"], IMAGE["ar_width"])
    with pytest.raises(ValueError, match="ar_height"):
        messages.plan_image_job(planner_pb2.PlanImageRequest(prompt="x", ar_height=10_000), IMAGE, LIMITS)
    # an official checkpoint's 1024x1024 default on a server capped at 256: the plan has no size to refuse
    capped = RequestLimits(max_width=256, max_height=256, max_steps=20)
    official = {**IMAGE, "width": 1024, "height": 1024, "steps": 50}
    assert messages.plan_image_job(planner_pb2.PlanImageRequest(prompt="a cat"), official, capped).prompt == "a cat"


@pytest.mark.parametrize("job", [_edit_job(), _video_job(), _video_job(edit=True)], ids=["edit", "t2v", "v2v"])
def test_dit_gets_the_same_latent_shape_and_sampling(job):
    job.sigmas = [1.0, 0.5, 0.25]
    again = messages.denoise_job(messages.denoise_request(job), "mammoth2" if job.spatial == 8 else "mammoth25",
                                 IMAGE if job.spatial == 8 else VIDEO)
    assert (again.latent_height, again.latent_width) == (job.latent_height, job.latent_width)
    assert (again.request_id, again.steps, again.seed, again.sigmas, again.preview) == (
        job.request_id, job.steps, job.seed, job.sigmas, job.preview)
    assert again.cfg_range == pytest.approx(job.cfg_range)
    if job.spatial == 8:
        assert (again.text_guidance, again.image_guidance) == (job.text_guidance, job.image_guidance)
    else:
        assert again.latent_frames == job.latent_frames
        assert (again.guidance, again.context_guidance) == (job.guidance, job.context_guidance)


def test_reference_encodes_carry_size_policy_and_only_the_first_may_pick_the_size():
    job = _edit_job()
    assert job.size_from_reference
    first = messages.reference_encode_request(job, 0, sized=False)
    encoded = messages.encode_job(first, IMAGE, LIMITS, video=False)
    assert encoded.size_from_reference and encoded.resize_policy == "pad" and encoded.reference_images == [PNG]
    assert encoded.width * encoded.height == job.width * job.height  # the same area budget
    job.width, job.height = 320, 192
    second = messages.encode_job(messages.reference_encode_request(job, 1, sized=True), IMAGE, LIMITS, video=False)
    assert not second.size_from_reference and (second.width, second.height) == (320, 192)


@pytest.mark.parametrize("frames_field", [None, 9])
def test_source_video_encode_keeps_frames_and_size_policy(frames_field):
    job = _video_job(edit=True, **({} if frames_field is None else {"frames": frames_field}))
    request = messages.source_encode_request(job)
    encoded = messages.encode_job(request, VIDEO, LIMITS, video=True)
    assert encoded.frames_from_source == job.frames_from_source == (frames_field is None)
    assert encoded.frames == job.frames and (encoded.width, encoded.height) == (128, 64)
    assert encoded.multiple == job.multiple == 32


def test_decode_request_keeps_format_quality_and_fps():
    image = _edit_job()
    spec = messages.output_spec(messages.decode_request(image), video=False)
    assert (spec.format, spec.quality) == ("webp", 70)
    video = _video_job()
    spec = messages.output_spec(messages.decode_request(video), video=True)
    assert (spec.format, spec.fps) == ("mp4", 12)


def test_video_prompts_go_to_the_planner_with_their_negative():
    request = messages.encode_prompt_request(_video_job(negative_prompt=""))
    assert request.prompt == "snow" and request.HasField("negative_prompt") and request.negative_prompt == ""


def test_understand_request_round_trips():
    msg = generation_pb2.UnderstandRequest(max_tokens=17, temperature=0.5, top_p=0.25, seed=4, stop=["END"])
    msg.messages.add(role="system").content.add(text="be brief")
    user = msg.messages.add(role="user")
    user.content.add(text="what is this?")
    user.content.add().image.data = PNG
    job = understand_job(msg, LIMITS)
    again = understand_job(messages.understand_request(job), LIMITS)
    assert (again.messages, again.max_tokens, again.temperature, again.top_p, again.seed, again.stop) == (
        job.messages, job.max_tokens, job.temperature, job.top_p, job.seed, job.stop)



# ------------------------------------------------------------------ stage services' own limits


def _denoise(**fields) -> dit_pb2.DenoiseRequest:
    return dit_pb2.DenoiseRequest(**{"latent_height": 8, "latent_width": 8, "steps": 2, **fields})


@pytest.mark.parametrize("fields,field", [
    ({"steps": 10**6}, "steps"),
    ({"latent_height": 0}, "latent_height"),
    ({"latent_width": 7}, "latent_width"),
    ({"latent_height": 10**6}, "latent_height"),
    ({"latent_frames": 5}, "latent_frames"),  # an image DiT
    ({"text_guidance": float("nan")}, "text_guidance"),
    ({"text_guidance": float("inf")}, "text_guidance"),
    ({"sigmas": [0.5] * 101}, "sigmas"),
    ({"sigmas": [float("nan")]}, "sigmas[0]"),
    ({"seed": -1}, "seed"),
    ({"request_id": "x" * 1000}, "request_id"),
    ({"request_id": "bad\nid"}, "request_id"),
])
def test_denoise_requests_are_checked_against_the_limits(fields, field):
    with pytest.raises(InvalidArgument) as info:
        messages.denoise_job(_denoise(**fields), "mammoth2", IMAGE, LIMITS)
    assert info.value.field == field


def test_denoise_latent_tokens_bound_and_defaults_when_no_limits_are_given():
    with pytest.raises(InvalidArgument, match="latent positions"):
        messages.denoise_job(_denoise(latent_height=32, latent_width=32), "mammoth2", IMAGE, LIMITS,
                             max_latent_tokens=100)
    with pytest.raises(InvalidArgument, match="steps"):  # without a config the engine's bounds apply
        messages.denoise_job(_denoise(steps=201), "mammoth2", IMAGE)
    assert messages.denoise_job(_denoise(steps=200), "mammoth2", IMAGE).steps == 200
    assert messages.denoise_job(_denoise(), "mammoth2", IMAGE, LIMITS).steps == 2


@pytest.mark.parametrize("request_fields,field", [
    ({"width": 100, "height": 64}, "width"),
    ({"width": 64}, "height"),
    ({"width": 64, "height": 10**6}, "height"),
    ({"media": common_pb2.Media(data=b"")}, "media"),
    ({"resize_policy": 99}, "resize_policy"),
])
def test_encode_requests_are_checked_against_the_limits(request_fields, field):
    request = vae_pb2.EncodeRequest(**{"media": common_pb2.Media(data=b"png"), **request_fields})
    with pytest.raises(InvalidArgument) as info:
        messages.encode_job(request, IMAGE, LIMITS, video=False)
    assert info.value.field == field


def test_encode_media_over_the_byte_limit_is_refused():
    small = LIMITS.model_copy(update={"max_image_bytes": 10})
    with pytest.raises(InvalidArgument, match="exceed"):
        messages.encode_job(vae_pb2.EncodeRequest(media=common_pb2.Media(data=b"x" * 11)), IMAGE, small, video=False)


@pytest.mark.parametrize("request_msg,video,field", [
    (vae_pb2.DecodeRequest(quality=0), False, "quality"),
    (vae_pb2.DecodeRequest(quality=101), False, "quality"),
    (vae_pb2.DecodeRequest(image_format=77), False, "image_format"),
    (vae_pb2.DecodeRequest(fps=10**6), True, "fps"),
])
def test_decode_output_specs_are_checked(request_msg, video, field):
    with pytest.raises(InvalidArgument) as info:
        messages.output_spec(request_msg, video=video, limits=LIMITS)
    assert info.value.field == field
