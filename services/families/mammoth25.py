"""MammothModa2.5 ("mammoth25"): text-to-video, video editing and understanding.

The planner (Qwen3-VL) only encodes prompts; a Mixture-of-Experts video DiT (which may run as a
multi-rank group, ``dit.engine.parallel``) denoises latent frames; a video VAE (temporal 4x)
encodes source videos and decodes.
"""

from __future__ import annotations

from typing import Any

from ..config import RequestLimits
from ..handoff import EncodedMedia, PromptConditions
from ..jobs import VideoJob, video_job
from ..stage_messages import video_denoise_job
from . import ModelFamily

DEFAULTS: dict[str, Any] = {
    "width": 832, "height": 480, "frames": 81, "fps": 16, "steps": 50, "guidance": 5.0,
    "context_guidance": 1.0, "cfg_range": [0.0, 1.0], "negative_prompt": "",
    # The released 2.5 checkpoints pair the DiT with Wan2.2's 48-channel, 16x VAE.
    "vae_spatial_compression": 16, "patch_size": 2,
}


def build_job(msg: Any, defaults: dict[str, Any], limits: RequestLimits, task: str) -> VideoJob:
    return video_job(msg, defaults, limits, edit=task == "video_edit")


def dit_inputs(request: Any) -> tuple[PromptConditions, list[EncodedMedia]]:
    """A ``DenoiseRequest`` from a gRPC caller: prompt/negative hidden states, source latents."""
    from protos.tensors import tensor_field

    prompt = tensor_field(request, "prompt_condition", required=True)
    negative, source = tensor_field(request, "negative_condition"), tensor_field(request, "source_latents")
    conditions = PromptConditions(prompt.numpy(), negative.numpy() if negative is not None else None)
    return conditions, [EncodedMedia([source.numpy()], [], 0, 0)] if source is not None else []


FAMILY = ModelFamily(
    name="mammoth25",
    description="MammothModa2.5: prompt encoder + Mixture-of-Experts video DiT",
    tasks=("text_to_video", "video_edit", "understand"),
    output="video",
    defaults=DEFAULTS,
    build_job=build_job,
    denoise_job=video_denoise_job,
    dit_inputs=dit_inputs,
    engines={"planner": "planner.engine:PlannerEngine", "dit": "dit_worker.engine:DiTEngine",
             "vae": "vae_worker.engine:VideoVAE"},
    parallel_dit=True,
)
