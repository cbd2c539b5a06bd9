"""Jobs <-> the stage services' request messages (``mammoth.v1.Planner``, ``DiT``, ``VAE``).

The pipeline ingress calls each stage application by handle with the same request message a
gRPC client of that stage sends, so a stage has one way in. Tensors one stage makes for the
next are not put inside those messages: they travel beside them as numpy (``handoff``), which
Ray's object store hands over without a copy, where a message's bytes field would be copied
at every hop.

``*_request`` builds a stage message from a resolved job (ingress side); ``*_job`` turns a
stage message back into the job its stage runs, filling what a direct gRPC caller left unset
from the model's defaults and checking it against the limits (stage side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from protos import common_pb2, dit_pb2, generation_pb2, planner_pb2, vae_pb2
from protos.tensors import ndarray_from_proto, tensor_to_proto

from .config import RequestLimits
from .families import get_family
from .jobs import (
    TEMPORAL_COMPRESSION,
    ImageJob,
    InvalidArgument,
    OutputSpec,
    UnderstandJob,
    VideoJob,
    check_cfg_range,
    check_float,
    check_int,
    check_media,
    check_seed,
    check_size,
    check_text,
    geometry,
    image_job,
    new_request_id,
    reference_budget,
    step_cache_knobs,
)
from .media_formats import (
    DEFAULT_QUALITY,
    IMAGE_FORMAT_IDS,
    IMAGE_FORMATS,
    RESIZE_POLICIES,
    RESIZE_POLICY_IDS,
    VIDEO_FORMAT_IDS,
    VIDEO_FORMATS,
)

if TYPE_CHECKING:
    from .families import ModelFamily

MAX_REQUEST_ID_CHARS = 128
# What the DiT engine itself accepts (dit_worker.sampling: 1..200 steps), for callers without a config
_ENGINE_LIMITS = RequestLimits(max_steps=200, max_width=1 << 15, max_height=1 << 15, max_frames=1 << 12,
                               max_guidance=1e4)

# PlanImageRequest field -> the public image request field it sets
_PLAN_FIELDS = {"ar_height": "ar_height", "ar_width": "ar_width", "temperature": "ar_temperature",
                "top_k": "ar_top_k", "top_p": "ar_top_p", "negative_prompt": "negative_prompt",
                "cfg_scale": "ar_cfg_scale"}


# ------------------------------------------------------------------------------- planner


def plan_image_request(job: ImageJob, reference_codes: Any = ()) -> planner_pb2.PlanImageRequest:
    """Reference images are not in it: the pipeline passes the VAE's encoded references (fitted
    pixels, MammothTok codes) beside it. ``reference_codes`` (int ``[rows, cols]`` grids) are for
    callers that hold codes themselves, e.g. from ``VAE.Encode``."""
    request = planner_pb2.PlanImageRequest(
        request_id=job.request_id, prompt=job.prompt, ar_height=job.ar_height, ar_width=job.ar_width,
        cfg_scale=job.ar_cfg_scale, seed=job.seed, temperature=job.ar_temperature, top_k=job.ar_top_k,
        top_p=job.ar_top_p, negative_prompt=job.negative_prompt or "")  # "": none, not the default
    for grid in reference_codes:
        tensor_to_proto(np.ascontiguousarray(grid, dtype=np.int32), out=request.reference_codes.add())
    return request


def reference_codes(request: planner_pb2.PlanImageRequest) -> list[np.ndarray]:
    """``reference_codes`` checked: integer ``[rows, cols]`` grids, one per reference image when
    the message carries images too (the planner checks the codes against its visual range)."""
    grids = []
    for i, msg in enumerate(request.reference_codes):
        name = f"reference_codes[{i}]"
        grid = ndarray_from_proto(msg, name=name)
        if grid.ndim != 2 or 0 in grid.shape or grid.dtype.kind not in "iu":
            raise InvalidArgument(name, f"expected a non-empty integer [rows, cols] grid, got {grid.dtype} "
                                        f"{tuple(grid.shape)}")
        grids.append(grid.astype(np.int32))
    if grids and request.reference_images and len(grids) != len(request.reference_images):
        raise InvalidArgument("reference_codes", f"{len(grids)} grids for {len(request.reference_images)} "
                                                 "reference_images")
    return grids


def plan_image_job(request: planner_pb2.PlanImageRequest, defaults: dict[str, Any],
                   limits: RequestLimits) -> ImageJob:
    """Checked like the public request it stands for; unset fields take the model's defaults.
    Reference images in the message (a direct gRPC caller) make it an edit."""
    edit = bool(request.reference_images)
    msg: Any = (generation_pb2.EditImageRequest(instruction=request.prompt) if edit
                else generation_pb2.GenerateImageRequest(prompt=request.prompt))
    for name, target in _PLAN_FIELDS.items():
        if request.HasField(name):
            setattr(msg, target, getattr(request, name))
    msg.seed = request.seed
    if edit:
        msg.reference_images.extend(request.reference_images)
    else:  # a plan does not depend on the output size (the AR grid does): one within the limits stands in
        msg.width, msg.height = reference_budget(defaults, limits, geometry(defaults)[1])
    msg.steps = 1  # nor on the DiT's steps (an official default of 50 must not refuse a capped server)
    job = image_job(msg, defaults, limits, edit=edit)
    job.request_id = request.request_id or job.request_id
    return job


def encode_prompt_request(job: VideoJob) -> planner_pb2.EncodePromptRequest:
    prompt, negative = job.planner_prompts()
    return planner_pb2.EncodePromptRequest(request_id=job.request_id, prompt=prompt, negative_prompt=negative)


def understand_request(job: UnderstandJob) -> generation_pb2.UnderstandRequest:
    request = generation_pb2.UnderstandRequest(max_tokens=job.max_tokens, temperature=job.temperature,
                                               top_p=job.top_p, stop=job.stop)
    if job.seed is not None:
        request.seed = job.seed
    for message in job.messages:
        out = request.messages.add(role=message["role"])
        for part in message["content"]:
            if part["type"] == "text":
                out.content.add(text=part["text"])
            else:
                getattr(out.content.add(), part["type"]).data = part["data"]
    return request


# ----------------------------------------------------------------------------------- VAE


def reference_encode_request(job: ImageJob, index: int, *, sized: bool) -> vae_pb2.EncodeRequest:
    """Reference ``index`` of an edit; ``sized=False`` lets the image pick the output size."""
    request = vae_pb2.EncodeRequest(request_id=job.request_id, kind=vae_pb2.MEDIA_KIND_IMAGE,
                                    media=common_pb2.Media(data=job.reference_images[index]),
                                    resize_policy=RESIZE_POLICY_IDS[job.resize_policy])
    if sized:
        request.width, request.height = job.width, job.height
    return request


def source_encode_request(job: VideoJob) -> vae_pb2.EncodeRequest:
    request = vae_pb2.EncodeRequest(request_id=job.request_id, kind=vae_pb2.MEDIA_KIND_VIDEO,
                                    media=common_pb2.Media(data=job.source_video or b""),
                                    resize_policy=RESIZE_POLICY_IDS[job.resize_policy],
                                    frames=0 if job.frames_from_source else job.frames,
                                    max_frames=job.frames)
    if not job.size_from_source:
        request.width, request.height = job.width, job.height
    return request


def encode_job(request: vae_pb2.EncodeRequest, defaults: dict[str, Any], limits: RequestLimits,
               *, video: bool) -> ImageJob | VideoJob:
    """What the VAE stage encodes: one image (as an edit's only reference) or one video."""
    has_size = request.HasField("width") and request.HasField("height")
    if request.HasField("width") != request.HasField("height"):
        raise InvalidArgument("width" if not request.HasField("width") else "height", "set both width and height, or neither")
    if request.resize_policy not in RESIZE_POLICIES:
        raise InvalidArgument("resize_policy", f"unknown value {request.resize_policy}")
    policy = RESIZE_POLICIES[request.resize_policy]
    spatial, multiple = geometry(defaults)
    if has_size:
        check_size("width", request.width, limits.max_width, multiple)
        check_size("height", request.height, limits.max_height, multiple)
    check_media("media", request.media.data, limits.max_video_bytes if video else limits.max_image_bytes)
    request_id = check_request_id(request.request_id) or new_request_id("encode")
    if video:
        check_int("frames", request.frames, 0, limits.max_frames)
        check_int("max_frames", request.max_frames, 0, limits.max_frames)
        frames = request.frames or request.max_frames or limits.max_frames
        return VideoJob(
            request_id=request_id, prompt="", negative_prompt="",
            width=request.width if has_size else defaults.get("width", limits.max_width),
            height=request.height if has_size else defaults.get("height", limits.max_height),
            frames=frames, fps=0, steps=1, seed=0, guidance=1.0, context_guidance=1.0, cfg_range=(0.0, 1.0),
            output=OutputSpec("mp4"), source_video=request.media.data, resize_policy=policy,
            size_from_source=not has_size, frames_from_source=not request.frames, spatial=spatial,
            multiple=multiple)
    width, height = (request.width, request.height) if has_size else reference_budget(defaults, limits, multiple)
    return ImageJob(
        request_id=request_id, prompt="", negative_prompt=None, width=width, height=height,
        steps=1, seed=0, text_guidance=1.0, image_guidance=1.0, cfg_range=(0.0, 1.0), ar_height=1,
        ar_width=1, ar_cfg_scale=1.0, ar_temperature=1.0, ar_top_k=0, ar_top_p=1.0,
        output=OutputSpec("png"), reference_images=[request.media.data], resize_policy=policy,
        size_from_reference=not has_size, spatial=spatial, multiple=multiple)


def decode_request(job: ImageJob | VideoJob) -> vae_pb2.DecodeRequest:
    """Latents are not in it: they come from the DiT by reference."""
    request = vae_pb2.DecodeRequest(request_id=job.request_id, quality=job.output.quality)
    if isinstance(job, VideoJob):
        request.video_format, request.fps = VIDEO_FORMAT_IDS[job.output.format], job.fps
    else:
        request.image_format = IMAGE_FORMAT_IDS[job.output.format]
    return request


def output_spec(request: vae_pb2.DecodeRequest, *, video: bool, limits: RequestLimits | None = None) -> OutputSpec:
    limits = limits or RequestLimits()
    check_request_id(request.request_id)
    quality = check_int("quality", request.quality, 1, 100) if request.HasField("quality") else DEFAULT_QUALITY
    if video:
        fps = check_int("fps", request.fps, 0, limits.max_fps)
        return OutputSpec(_known("video_format", request.video_format, VIDEO_FORMATS), fps=fps or 16)
    return OutputSpec(_known("image_format", request.image_format, IMAGE_FORMATS), quality)


def _known(name: str, value: int, table: dict[int, str]) -> str:
    if value not in table:
        raise InvalidArgument(name, f"unknown value {value}")
    return table[value]


def check_request_id(request_id: str) -> str:
    """A caller-chosen id ends up in logs and responses: short and printable, or refused."""
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return request_id


# ----------------------------------------------------------------------------------- DiT


def denoise_request(job: ImageJob | VideoJob) -> dit_pb2.DenoiseRequest:
    """Conditions and encoded media are not in it: they come from the planner and VAE beside it."""
    request = dit_pb2.DenoiseRequest(
        request_id=job.request_id, latent_height=job.latent_height, latent_width=job.latent_width,
        steps=job.steps, sigmas=job.sigmas or [], seed=job.seed, preview=job.preview,
        cfg_range=common_pb2.CfgRange(start=job.cfg_range[0], end=job.cfg_range[1]))
    if isinstance(job, VideoJob):
        request.latent_frames = job.latent_frames
        request.guidance, request.context_guidance = job.guidance, job.context_guidance
        request.glyph_text, request.negative_glyph_text = job.glyph_text or "", job.negative_glyph_text or ""
    else:
        request.latent_frames = 1
        request.text_guidance, request.image_guidance = job.text_guidance, job.image_guidance
    request.step_cache_threshold, request.step_cache_warmup = job.step_cache_threshold, job.step_cache_warmup
    request.step_cache_max_cached_steps = job.step_cache_max_cached_steps
    return request


def denoise_job(request: dit_pb2.DenoiseRequest, family: str | ModelFamily, defaults: dict[str, Any],
                limits: RequestLimits | None = None, *, max_latent_tokens: int | None = None) -> ImageJob | VideoJob:
    """The DiT works in latent units: the job's pixel sizes are latent sizes times 8, and its
    ``spatial`` is 8, so ``job.latent_*`` give back the request's sizes whatever the VAE.

    Checked against ``limits`` (the served config's) like a public request: latent sizes within
    the pixel limits, steps, guidance, frames. Without ``limits`` (in-process callers) only the
    engine's own bounds apply (``_ENGINE_LIMITS``). The family (a name or its record) builds
    the job: ``image_denoise_job`` or ``video_denoise_job`` for the built-in ones."""
    record = get_family(family) if isinstance(family, str) else family
    return record.denoise_job(request, defaults, limits or _ENGINE_LIMITS, max_latent_tokens=max_latent_tokens)


@dataclass(frozen=True)
class _DenoiseFields:
    request_id: str
    width: int
    height: int
    steps: int
    seed: int
    cfg_range: tuple[float, float]


def _checked_denoise(request: dit_pb2.DenoiseRequest, defaults: dict[str, Any], limits: RequestLimits,
                     max_latent_frames: int, max_latent_tokens: int | None) -> _DenoiseFields:
    """The checks every family's DiT applies; ``max_latent_frames`` is the family's latent rule."""
    request_id = check_request_id(request.request_id) or new_request_id("dit")
    spatial, _ = geometry(defaults)
    patch = int(defaults.get("patch_size", 2))
    for name, value, limit in (("latent_height", request.latent_height, limits.max_height),
                               ("latent_width", request.latent_width, limits.max_width)):
        check_int(name, value, patch, max(limit // spatial, patch))
        if value % patch:
            raise InvalidArgument(name, f"must be a multiple of the patch size {patch}, got {value}")
    check_int("latent_frames", request.latent_frames, 0, max_latent_frames)
    positions = request.latent_height * request.latent_width * max(request.latent_frames, 1)  # as the engine counts
    if max_latent_tokens is not None and positions > max_latent_tokens:
        raise InvalidArgument("latent_height", f"{positions} latent positions exceed the limit {max_latent_tokens}")
    steps = check_int("steps", request.steps or defaults.get("steps", 50), 1, limits.max_steps)
    if len(request.sigmas) > limits.max_steps:
        raise InvalidArgument("sigmas", f"{len(request.sigmas)} values exceed the limit {limits.max_steps}")
    for i, sigma in enumerate(request.sigmas):
        check_float(f"sigmas[{i}]", sigma, 0.0, 1.0)
    for name in ("text_guidance", "image_guidance", "guidance", "context_guidance"):
        if request.HasField(name):
            check_float(name, getattr(request, name), 0.0, limits.max_guidance)
    return _DenoiseFields(request_id, request.latent_width * 8, request.latent_height * 8, steps,
                          check_seed(request.seed), check_cfg_range(request, (0.0, 1.0)))


def image_denoise_job(request: dit_pb2.DenoiseRequest, defaults: dict[str, Any], limits: RequestLimits, *,
                      max_latent_tokens: int | None = None) -> ImageJob:
    """An image DiT's job: one latent frame at most."""
    f = _checked_denoise(request, defaults, limits, 1, max_latent_tokens)
    return ImageJob(
        request_id=f.request_id, prompt="", negative_prompt=None, width=f.width, height=f.height, steps=f.steps,
        seed=f.seed, text_guidance=_or(request, "text_guidance", defaults.get("text_guidance", 5.0)),
        image_guidance=_or(request, "image_guidance", defaults.get("image_guidance", 2.0)),
        cfg_range=f.cfg_range, ar_height=0, ar_width=0, ar_cfg_scale=1.0, ar_temperature=1.0, ar_top_k=0,
        ar_top_p=1.0, output=OutputSpec("png"), preview=request.preview, sigmas=list(request.sigmas) or None,
        **step_cache_knobs(request, defaults))


def video_denoise_job(request: dit_pb2.DenoiseRequest, defaults: dict[str, Any], limits: RequestLimits, *,
                      max_latent_tokens: int | None = None) -> VideoJob:
    """A video DiT's job: latent frames up to what ``limits.max_frames`` compresses to."""
    max_latent_frames = (limits.max_frames - 1) // TEMPORAL_COMPRESSION + 1
    f = _checked_denoise(request, defaults, limits, max_latent_frames, max_latent_tokens)
    return VideoJob(
        request_id=f.request_id, prompt="", negative_prompt="", width=f.width, height=f.height,
        frames=(max(request.latent_frames, 1) - 1) * TEMPORAL_COMPRESSION + 1, fps=16, steps=f.steps, seed=f.seed,
        guidance=_or(request, "guidance", defaults.get("guidance", 5.0)),
        context_guidance=_or(request, "context_guidance", defaults.get("context_guidance", 1.0)),
        cfg_range=f.cfg_range, output=OutputSpec("mp4"), preview=request.preview, sigmas=list(request.sigmas) or None,
        glyph_text=_glyph("glyph_text", request.glyph_text, limits),
        negative_glyph_text=_glyph("negative_glyph_text", request.negative_glyph_text, limits),
        **step_cache_knobs(request, defaults))


def _glyph(name: str, text: str, limits: RequestLimits) -> str | None:
    """Glyph text, checked like a prompt (characters; length up to what the ingress makes of a
    longest prompt: ``Text "x". `` per quoted ``"x"``, under 4x); empty: none."""
    if len(text) > 4 * limits.max_prompt_chars:
        raise InvalidArgument(name, f"{len(text)} characters exceed the limit {4 * limits.max_prompt_chars}")
    return check_text(name, text, limits.model_copy(update={"max_prompt_chars": max(len(text), 1)}),
                      required=False) or None


def _or(request: Any, name: str, default: float) -> float:
    return getattr(request, name) if request.HasField(name) else default
