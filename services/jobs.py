"""Public requests -> fully resolved jobs: model defaults filled in, limits enforced.

Everything a client can get wrong is checked here, before any stage does work, and every
problem is an ``InvalidArgument`` that names the request field. Jobs are plain dataclasses
(no torch, no protos) so they cross Ray handles cheaply and read the same in every stage.
"""

from __future__ import annotations

import math
import secrets
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any

from .config import RequestLimits
from .glyph_text import glyph_text, without_quoted_text
from .media_formats import DEFAULT_QUALITY, IMAGE_FORMATS, RESIZE_POLICIES, VIDEO_FORMATS

TEMPORAL_COMPRESSION = 4  # video VAE: frames = 4k + 1
_ALLOWED_CONTROL = frozenset("\t\n\r")  # the only control characters a prompt may carry


def geometry(defaults: dict[str, Any]) -> tuple[int, int]:
    """(VAE spatial compression, pixel multiple) of a model: one DiT token covers
    ``compression * patch`` pixels a side (16 for the 8x VAEs, 32 for Wan2.2's 16x)."""
    spatial = int(defaults.get("vae_spatial_compression", 8))
    return spatial, spatial * int(defaults.get("patch_size", 2))


class InvalidArgument(ValueError):
    """A request that cannot be served as it is; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def __reduce__(self):  # crosses Ray process boundaries intact
        return type(self), (self.field, self.detail)


@dataclass
class OutputSpec:
    format: str
    quality: int = DEFAULT_QUALITY
    fps: int = 0


class _LatentSize:
    """Latent height/width of a job from its pixel size and the model's VAE compression."""

    height: int
    width: int
    spatial: int

    @property
    def latent_height(self) -> int:
        return self.height // self.spatial

    @property
    def latent_width(self) -> int:
        return self.width // self.spatial


@dataclass
class ImageJob(_LatentSize):
    """Text-to-image or image editing, fully resolved."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    seed: int
    text_guidance: float
    image_guidance: float
    cfg_range: tuple[float, float]
    ar_height: int
    ar_width: int
    ar_cfg_scale: float
    ar_temperature: float
    ar_top_k: int
    ar_top_p: float
    output: OutputSpec
    preview: bool = False
    reference_images: list[bytes] = field(default_factory=list)
    resize_policy: str = "resize"
    size_from_reference: bool = False
    sigmas: list[float] | None = None  # explicit schedule for few-step (distilled) checkpoints
    step_cache_threshold: float = 0.0  # DiT step cache (dit_worker.step_cache); 0 = off
    step_cache_warmup: float = 0.1
    step_cache_max_cached_steps: int = 3
    spatial: int = 8  # VAE spatial compression
    multiple: int = 16  # sizes are multiples of this many pixels

    @property
    def planned_tokens(self) -> int:
        return self.ar_height * (self.ar_width + 1)


@dataclass
class VideoJob(_LatentSize):
    """Text-to-video or video editing, fully resolved."""

    request_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    seed: int
    guidance: float
    context_guidance: float
    cfg_range: tuple[float, float]
    output: OutputSpec
    preview: bool = False
    source_video: bytes | None = None
    resize_policy: str = "resize"
    size_from_source: bool = False
    frames_from_source: bool = False
    sigmas: list[float] | None = None
    step_cache_threshold: float = 0.0  # DiT step cache (dit_worker.step_cache); 0 = off
    step_cache_warmup: float = 0.1
    step_cache_max_cached_steps: int = 3
    spatial: int = 8
    multiple: int = 16
    # Glyph checkpoints (defaults ``glyph_text``): the ByT5 input of the prompt's / negative
    # prompt's quoted text (``services.glyph_text``), None without quotes or on other checkpoints.
    glyph_text: str | None = None
    negative_glyph_text: str | None = None
    glyph: bool = False  # the checkpoint renders quoted text: the planner sees it emptied

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL_COMPRESSION + 1

    def planner_prompts(self) -> tuple[str, str]:
        """Prompt and negative prompt as the planner encodes them (official: with the glyph
        encoder on, quoted spans are emptied, their text reaches the DiT as glyph text)."""
        if not self.glyph:
            return self.prompt, self.negative_prompt
        return without_quoted_text(self.prompt), without_quoted_text(self.negative_prompt)


@dataclass
class UnderstandJob:
    request_id: str
    messages: list[dict[str, Any]]  # OpenAI-style; media parts carry raw bytes: {"type": "image", "data": b""}
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"


# ----------------------------------------------------------------------------- field checks


def _opt(msg: Any, name: str) -> Any:
    """Value of a proto3 ``optional`` field, or None when unset (also works on plain objects)."""
    has = getattr(msg, "HasField", None)
    if has is not None:
        try:
            return getattr(msg, name) if has(name) else None
        except ValueError:  # not an optional field: plain value
            return getattr(msg, name)
    return getattr(msg, name, None)


def check_text(name: str, value: str, limits: RequestLimits, *, required: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(name, "must be a string")
    if required and not value.strip():
        raise InvalidArgument(name, "must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise InvalidArgument(name, f"{len(value)} characters exceed the limit {limits.max_prompt_chars}")
    if "\x00" in value:
        raise InvalidArgument(name, "contains a NUL character")
    bad = next((c for c in value if c not in _ALLOWED_CONTROL and unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise InvalidArgument(name, f"contains the control character U+{ord(bad):04X}")
    return value


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be in [{low}, {high}], got {value}")
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be in [{low}, {high}], got {value}")
    return float(value)


def reference_budget(defaults: dict[str, Any], limits: RequestLimits, multiple: int) -> tuple[int, int]:
    """The area an edit with no size may fill: the model's default size, clamped to the limits
    (an official checkpoint's 1024x1024 default must not refuse a server capped at 256)."""
    width = min(int(defaults.get("width", 1024)), limits.max_width) // multiple * multiple
    height = min(int(defaults.get("height", 1024)), limits.max_height) // multiple * multiple
    return max(width, multiple), max(height, multiple)


def check_size(name: str, value: int, limit: int, multiple: int = 16) -> int:
    value = check_int(name, value, multiple, limit)
    if value % multiple:
        raise InvalidArgument(name, f"must be a multiple of {multiple} pixels, got {value}")
    return value


def check_seed(value: Any) -> int:
    if value is None:
        return secrets.randbelow(2**31)
    return check_int("seed", value, 0, 2**63 - 1)


def check_cfg_range(msg: Any, default: Any) -> tuple[float, float]:
    has = getattr(msg, "HasField", None)
    if has is not None and has("cfg_range"):
        start, end = msg.cfg_range.start, msg.cfg_range.end
    elif isinstance(getattr(msg, "cfg_range", None), list | tuple):
        start, end = msg.cfg_range
    else:
        start, end = default
    start = check_float("cfg_range.start", start, 0.0, 1.0)
    end = check_float("cfg_range.end", end, 0.0, 1.0)
    if start > end:
        raise InvalidArgument("cfg_range", f"start {start} is after end {end}")
    return start, end


def _quality(msg: Any) -> int:
    quality = _opt(msg, "quality")
    return DEFAULT_QUALITY if quality is None else check_int("quality", quality, 1, 100)


def _enum(name: str, value: int, table: dict[int, str]) -> str:
    if value not in table:
        raise InvalidArgument(name, f"unknown value {value}")
    return table[value]


def check_media(name: str, data: bytes, limit: int) -> bytes:
    if not data:
        raise InvalidArgument(name, "is empty")
    if len(data) > limit:
        raise InvalidArgument(name, f"{len(data)} bytes exceed the limit {limit}")
    return bytes(data)


# ----------------------------------------------------------------------------- builders


def step_cache_knobs(msg: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's DiT step-cache knobs, else the model's defaults (``step_cache_*``), else off."""
    return {
        "step_cache_threshold": check_float("step_cache_threshold", _or(
            msg, "step_cache_threshold", defaults.get("step_cache_threshold", 0.0)), 0.0, 10.0),
        "step_cache_warmup": check_float("step_cache_warmup", _or(
            msg, "step_cache_warmup", defaults.get("step_cache_warmup", 0.1)), 0.0, 1.0),
        "step_cache_max_cached_steps": check_int("step_cache_max_cached_steps", _or(
            msg, "step_cache_max_cached_steps", defaults.get("step_cache_max_cached_steps", 3)), 0, 1000),
    }


def image_job(msg: Any, defaults: dict[str, Any], limits: RequestLimits, *, edit: bool) -> ImageJob:
    """``GenerateImageRequest`` / ``EditImageRequest`` -> ``ImageJob``."""
    prompt = check_text("instruction" if edit else "prompt", msg.instruction if edit else msg.prompt, limits)
    negative = _opt(msg, "negative_prompt")
    negative = defaults.get("negative_prompt", "") if negative is None else check_text(
        "negative_prompt", negative, limits, required=False)
    references: list[bytes] = []
    if edit:
        if not msg.reference_images:
            raise InvalidArgument("reference_images", "an edit needs at least one image")
        if len(msg.reference_images) > limits.max_reference_images:
            raise InvalidArgument("reference_images",
                                  f"{len(msg.reference_images)} images exceed the limit {limits.max_reference_images}")
        references = [check_media(f"reference_images[{i}]", m.data, limits.max_image_bytes)
                      for i, m in enumerate(msg.reference_images)]
    width, height = _opt(msg, "width"), _opt(msg, "height")
    if (width is None) != (height is None):
        raise InvalidArgument("width" if width is None else "height", "set both width and height, or neither")
    from_reference = edit and width is None
    spatial, multiple = geometry(defaults)
    if from_reference:  # the first reference picks the size, within this area budget
        width, height = reference_budget(defaults, limits, multiple)
    width = check_size("width", defaults["width"] if width is None else width, limits.max_width, multiple)
    height = check_size("height", defaults["height"] if height is None else height, limits.max_height, multiple)
    steps = _opt(msg, "steps")
    return ImageJob(
        request_id=new_request_id("edit" if edit else "image"),
        prompt=prompt,
        negative_prompt=negative or None,
        width=width, height=height,
        steps=check_int("steps", defaults["steps"] if steps is None else steps, 1, limits.max_steps),
        seed=check_seed(_opt(msg, "seed")),
        text_guidance=check_float("text_guidance", _default(msg, "text_guidance", defaults), 0.0, limits.max_guidance),
        image_guidance=check_float("image_guidance", _default(msg, "image_guidance", defaults), 0.0, limits.max_guidance)
        if edit else 1.0,
        cfg_range=check_cfg_range(msg, defaults.get("cfg_range", (0.0, 1.0))),
        ar_height=check_int("ar_height", _default(msg, "ar_height", defaults), 1, limits.max_ar_grid),
        ar_width=check_int("ar_width", _default(msg, "ar_width", defaults), 1, limits.max_ar_grid),
        ar_cfg_scale=check_float("ar_cfg_scale", _default(msg, "ar_cfg_scale", defaults), 0.0, limits.max_guidance),
        # AR sampling defaults: the checkpoint's t2i_generation_config.json (via mammoth convert)
        ar_temperature=check_float("ar_temperature", _or(msg, "ar_temperature", defaults.get("ar_temperature", 1.0)),
                                   0.0, 5.0),
        ar_top_k=check_int("ar_top_k", _or(msg, "ar_top_k", defaults.get("ar_top_k", 0)), 0, 1 << 20),
        ar_top_p=check_float("ar_top_p", _or(msg, "ar_top_p", defaults.get("ar_top_p", 1.0)), 0.0, 1.0),
        output=OutputSpec(_enum("format", msg.format, IMAGE_FORMATS), _quality(msg)),
        preview=bool(msg.preview),
        reference_images=references,
        resize_policy=_enum("resize_policy", msg.resize_policy, RESIZE_POLICIES) if edit else "resize",
        size_from_reference=from_reference,
        spatial=spatial, multiple=multiple,
        **step_cache_knobs(msg, defaults),
    )


def video_job(msg: Any, defaults: dict[str, Any], limits: RequestLimits, *, edit: bool) -> VideoJob:
    """``GenerateVideoRequest`` / ``EditVideoRequest`` -> ``VideoJob``."""
    prompt = check_text("instruction" if edit else "prompt", msg.instruction if edit else msg.prompt, limits)
    negative = _opt(msg, "negative_prompt")
    negative = defaults.get("negative_prompt", "") if negative is None else check_text(
        "negative_prompt", negative, limits, required=False)
    source = None
    if edit:
        if not msg.HasField("source_video"):
            raise InvalidArgument("source_video", "required")
        source = check_media("source_video", msg.source_video.data, limits.max_video_bytes)
    width, height = _opt(msg, "width"), _opt(msg, "height")
    if (width is None) != (height is None):
        raise InvalidArgument("width" if width is None else "height", "set both width and height, or neither")
    frames = _opt(msg, "frames")
    frames_from_source = edit and frames is None
    frames = check_int("frames", defaults["frames"] if frames is None else frames, 1, limits.max_frames)
    if (frames - 1) % TEMPORAL_COMPRESSION:
        raise InvalidArgument("frames", f"must be 4k+1 (1, 5, 9, ...) for the video VAE, got {frames}")
    steps = _opt(msg, "steps")
    fps = _opt(msg, "fps")
    spatial, multiple = geometry(defaults)
    glyph = bool(defaults.get("glyph_text"))
    return VideoJob(
        request_id=new_request_id("vedit" if edit else "video"),
        prompt=prompt, negative_prompt=negative,
        width=check_size("width", defaults["width"] if width is None else width, limits.max_width, multiple),
        height=check_size("height", defaults["height"] if height is None else height, limits.max_height, multiple),
        frames=frames,
        fps=check_int("fps", defaults["fps"] if fps is None else fps, 1, limits.max_fps),
        steps=check_int("steps", defaults["steps"] if steps is None else steps, 1, limits.max_steps),
        seed=check_seed(_opt(msg, "seed")),
        guidance=check_float("guidance", _default(msg, "guidance", defaults), 0.0, limits.max_guidance),
        context_guidance=check_float("context_guidance", _default(msg, "context_guidance", defaults), 0.0, limits.max_guidance)
        if edit else 1.0,
        cfg_range=check_cfg_range(msg, defaults.get("cfg_range", (0.0, 1.0))),
        output=OutputSpec(_enum("format", msg.format, VIDEO_FORMATS), _quality(msg)),
        preview=bool(msg.preview),
        source_video=source,
        resize_policy=_enum("resize_policy", msg.resize_policy, RESIZE_POLICIES) if edit else "resize",
        size_from_source=edit and width is None,
        frames_from_source=frames_from_source,
        spatial=spatial, multiple=multiple,
        glyph=glyph, glyph_text=glyph_text(prompt) if glyph else None,
        negative_glyph_text=glyph_text(negative) if glyph else None,
        **step_cache_knobs(msg, defaults),
    )


def _or(msg: Any, name: str, fallback: Any) -> Any:
    value = _opt(msg, name)
    return fallback if value is None else value


def _default(msg: Any, name: str, defaults: dict[str, Any]) -> Any:
    return _or(msg, name, defaults[name])


def understand_job(msg: Any, limits: RequestLimits) -> UnderstandJob:
    """``UnderstandRequest`` -> ``UnderstandJob`` (media stays bytes; the planner decodes it)."""
    if not msg.messages:
        raise InvalidArgument("messages", "at least one message is required")
    if len(msg.messages) > limits.max_messages:
        raise InvalidArgument("messages", f"{len(msg.messages)} messages exceed the limit {limits.max_messages}")
    messages: list[dict[str, Any]] = []
    media = 0
    for i, m in enumerate(msg.messages):
        if m.role not in ("system", "user", "assistant"):
            raise InvalidArgument(f"messages[{i}].role", f"must be system, user or assistant, got {m.role!r}")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            kind = part.WhichOneof("part")
            name = f"messages[{i}].content[{j}]"
            if kind == "text":
                parts.append({"type": "text", "text": check_text(f"{name}.text", part.text, limits, required=False)})
            elif kind in ("image", "video"):
                limit = limits.max_image_bytes if kind == "image" else limits.max_video_bytes
                media += 1
                if media > limits.max_reference_images:
                    raise InvalidArgument(name, f"more than {limits.max_reference_images} media items")
                parts.append({"type": kind, "data": check_media(f"{name}.{kind}", getattr(part, kind).data, limit)})
            else:
                raise InvalidArgument(name, "empty content part")
        if not parts:
            raise InvalidArgument(f"messages[{i}].content", "must not be empty")
        messages.append({"role": m.role, "content": parts})
    max_tokens = _opt(msg, "max_tokens")
    temperature = _opt(msg, "temperature")
    top_p = _opt(msg, "top_p")
    seed = _opt(msg, "seed")
    return UnderstandJob(
        request_id=new_request_id("chat"),
        messages=messages,
        max_tokens=check_int("max_tokens", 256 if max_tokens is None else max_tokens, 1, limits.max_understand_tokens),
        temperature=check_float("temperature", 1.0 if temperature is None else temperature, 0.0, 5.0),
        top_p=check_float("top_p", 1.0 if top_p is None else top_p, 0.0, 1.0),
        seed=None if seed is None else check_int("seed", seed, 0, 2**63 - 1),
        stop=[_check_stop(f"stop[{i}]", s, limits) for i, s in enumerate(msg.stop)],
    )


def _check_stop(name: str, value: str, limits: RequestLimits) -> str:
    """A stop sequence may be whitespace alone (``"\\n\\n"`` is a common one); only "" is refused."""
    if value == "":
        raise InvalidArgument(name, "must not be empty")
    return check_text(name, value, limits, required=False)
