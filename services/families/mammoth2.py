"""MammothModa2 ("mammoth2"): text-to-image, image editing and understanding.

A vLLM planner plans visual tokens and exports their hidden states, a single-stream image DiT
denoises one latent frame, an 8x ``AutoencoderKL`` VAE encodes references and decodes.
"""

from __future__ import annotations

from typing import Any

from ..config import RequestLimits
from ..handoff import EncodedMedia, ImageConditions
from ..jobs import ImageJob, image_job
from ..stage_messages import image_denoise_job
from . import ModelFamily

# The official MammothModa2 processor's default negative prompt (the DiT was tuned with it);
# a per-request field overrides it.
DEFAULT_NEGATIVE_PROMPT = (
    "deformed, blurry, over saturation, bad anatomy, disfigured, poorly drawn face, mutation, mutated, "
    "extra_limb, ugly, poorly drawn hands, fused fingers, messy drawing, broken legs censor, censored, "
    "censor_bar Create an image from the instruction."
)
DEFAULTS: dict[str, Any] = {
    "width": 1024, "height": 1024, "steps": 50, "text_guidance": 9.0, "image_guidance": 2.0,
    "cfg_range": [0.0, 1.0], "ar_height": 32, "ar_width": 32, "ar_cfg_scale": 7.0,
    "vae_spatial_compression": 8, "patch_size": 2,
    "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
}


def build_job(msg: Any, defaults: dict[str, Any], limits: RequestLimits, task: str) -> ImageJob:
    return image_job(msg, defaults, limits, edit=task == "image_edit")


def dit_inputs(request: Any) -> tuple[ImageConditions, list[EncodedMedia]]:
    """A ``DenoiseRequest`` from a gRPC caller: text/image/negative conditions, reference latents."""
    from protos.tensors import ndarray_from_proto, tensor_field

    text = tensor_field(request, "text_condition", required=True)
    image, negative = tensor_field(request, "image_condition"), tensor_field(request, "negative_condition")
    conditions = ImageConditions(text.numpy(), image.numpy() if image is not None else None,
                                 negative.numpy() if negative is not None else None, 0)
    refs = [ndarray_from_proto(t, name=f"ref_latents[{i}]") for i, t in enumerate(request.ref_latents)]
    return conditions, [EncodedMedia(refs, [], 0, 0)] if refs else []


FAMILY = ModelFamily(
    name="mammoth2",
    description="MammothModa2: AR planner + single-stream image DiT",
    tasks=("text_to_image", "image_edit", "understand"),
    output="image",
    defaults=DEFAULTS,
    build_job=build_job,
    denoise_job=image_denoise_job,
    dit_inputs=dit_inputs,
    engines={"planner": "planner.engine:PlannerEngine", "dit": "dit_worker.engine:DiTEngine",
             "vae": "vae_worker.engine:ImageVAE"},
)
