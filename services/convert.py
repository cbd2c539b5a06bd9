"""``mammoth convert``: an official MammothModa2 (-Dev / -Preview) / MammothModa2.5 checkpoint -> a model directory.

The official tensors are read lazily (safetensors headers first, then one tensor at a time,
memory-mapped) and written into one HF-style folder per stage, in shards. Each stage package
owns its name table (``planner.configuration``, ``dit_worker.official`` -- the DiT and 2.5's ByT5
glyph encoder --, ``vae_worker.official``, ``vae_worker.mammothtok``); this module only routes
official tensors to stages. Strict: every
official tensor is mapped to exactly one stage or listed in ``IGNORED`` with the reason, and
every error names the tensor or file.

Token ids, visual ranges, EOL, condition layers and sampling defaults are read from the
checkpoint's own files (``t2i_generation_config.json``, ``config.json``,
``scheduler/scheduler_config.json``, ``model_index.json``), never assumed.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dit_worker import official as dit_official
from dit_worker.models import glyph_encoder as glyph_models
from dit_worker.models.transformer_mammoth25 import BYT5_DIM
from planner.configuration import official_planner_names, planner_config_from_official
from planner.presets import DEFAULT_CONDITION_LAYERS, PREVIEW_CONDITION_LAYERS
from planner.tokens import TokenLayout, write_tokenizer_from_official
from vae_worker import official as vae_official
from vae_worker.mammothtok import official as tok_official

from .model_dir import FORMAT_VERSION, INDEX_NAME, ModelIndex, read_index
from .presets import get_preset

SOURCES = ("mammothmoda2", "mammothmoda2-preview", "mammothmoda25")
DEFAULT_SHARD_BYTES = 4 << 30

# Official tensors that no served stage uses, by prefix, with the reason (reported in the index).
IGNORED: dict[str, dict[str, str]] = {
    "mammothmoda2": {
        **{tok_official.OFFICIAL_PREFIX + p: why for p, why in tok_official.IGNORED_PREFIXES.items()},
        # Saved by earlier official code (a separate refiner module); the official model class
        # has no such child any more (its QFormer is gen_transformer.time_caption_embed.image_embedder).
        "gen_image_condition_refiner.": "not part of the official MammothModa2 model class",
    },
    "mammothmoda2-preview": {},
    "mammothmoda25": {},
}
# MammothModa2-Preview keeps the DiT's QFormer beside the transformer, at the top level: that
# official prefix -> where the DiT stage has it (under the DiT's own ``gen_transformer.``).
PREVIEW_REFINER_PREFIXES = {"gen_image_condition_refiner.": dit_official.OFFICIAL_PREFIX
                            + "time_caption_embed.image_embedder."}


class ConvertError(ValueError):
    """An official checkpoint that cannot be converted as it is; the message names the culprit."""


# ----------------------------------------------------------------------------------- reading


class TensorSource:
    """The tensors of one official folder: a ``*.safetensors.index.json`` weight map, or every
    ``*.safetensors`` file in it. Only headers are read until ``get``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        indexes = sorted(self.directory.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise ConvertError(f"{self.directory}: several weight indexes {[p.name for p in indexes]}")
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConvertError(f"{indexes[0]}: malformed weight index ({exc})") from exc
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            weight_map, files = None, sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{self.directory}: no safetensors files")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nbytes: dict[str, int] = {}
        for path in files:
            if not path.is_file():
                raise ConvertError(f"{path}: listed in the weight index but missing")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is no dict
                        if name in self.files:
                            raise ConvertError(f"tensor '{name}' is stored twice ({self.files[name].name}, {path.name})")
                        sl = handle.get_slice(name)
                        shape = tuple(sl.get_shape())
                        self.files[name], self.shapes[name] = path, shape
                        self.nbytes[name] = _DTYPE_BYTES.get(sl.get_dtype(), 4) * max(1, _numel(shape))
            except (SafetensorError, OSError) as exc:
                raise ConvertError(f"{path}: unreadable safetensors file ({exc})") from exc
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.files.get(name) != self.directory / fname:
                    raise ConvertError(f"{indexes[0].name}: tensor '{name}' is not in {fname}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise ConvertError(f"tensor '{name}' in {path} holds NaN or Inf values")
                    out[name] = tensor
        return out


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------- writing


def write_tensors(source: TensorSource, mapping: dict[str, str], directory: Path, stem: str,
                  shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``{ours: source[official]}`` as ``<stem>.safetensors`` or numbered shards + index."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for ours in sorted(mapping):
        n = source.nbytes[mapping[ours]]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(ours)
        size += n
    names = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        tensors = source.read([mapping[o] for o in shard])
        save_file({o: tensors[mapping[o]].contiguous() for o in shard}, str(directory / fname),
                  metadata={"format": "pt"})
        weight_map.update({o: fname for o in shard})
        del tensors
    if len(shards) > 1:
        total = sum(source.nbytes[mapping[o]] for o in mapping)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from exc


def _copy_files(src: Path, dst: Path, names: tuple[str, ...], *, required: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
        elif name in required:
            raise ConvertError(f"missing {name} in {src}")
    return copied


def _write_video_processor_config(planner_dir: Path, video_processor: str = "Qwen3VLVideoProcessor") -> None:
    """vLLM builds the Qwen-VL processor with its video half: derive that config from the
    checkpoint's image processor config (same patch / merge sizes) when it ships none."""
    image = _read_json(planner_dir / "preprocessor_config.json")
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    video.update(video_processor_type=video_processor, fps=2, do_sample_frames=True)
    _write_json(planner_dir / "video_preprocessor_config.json", video)


def planner_expected(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Planner tensor name -> shape for ``config`` (the reference model's names are the vLLM
    model's and the official ones), without the generation vocabulary when it has none."""
    from planner.reference import ReferencePlanner

    with torch.device("meta"):
        model = ReferencePlanner(config)
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if not config.get("extra_gen_vocab", True):
        state = {n: s for n, s in state.items() if "gen_embed_tokens" not in n and not n.startswith("gen_head")}
    return state


def check_mapping(stage: str, mapping: dict[str, str], expected: dict[str, tuple[int, ...]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor mapped, with its shape; errors name the official tensor."""
    missing = sorted(set(expected) - set(mapping))
    if missing:
        raise ConvertError(f"the official checkpoint lacks {stage} tensor for '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for ours, official in mapping.items():
        if ours not in expected:
            raise ConvertError(f"official tensor '{official}' has no place in the {stage}")
        if tuple(shapes[official]) != expected[ours]:
            raise ConvertError(f"official tensor '{official}' has shape {tuple(shapes[official])}, "
                               f"the {stage} config expects {expected[ours]}")


@dataclass
class Plan:
    """Where every official tensor of one folder goes: stage -> {ours: official}."""

    source: TensorSource
    stages: dict[str, dict[str, str]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # official name -> reason

    def route(self, stage: str, mapping: dict[str, str]) -> None:
        taken = {o: s for s, m in self.stages.items() for o in m.values()}
        for official in mapping.values():
            if official in taken:
                raise ConvertError(f"official tensor '{official}' mapped to both {taken[official]} and {stage}")
        self.stages[stage] = mapping

    def ignore(self, prefixes: dict[str, str]) -> None:
        for name in self.source.shapes:
            for prefix, why in prefixes.items():
                if name.startswith(prefix):
                    self.ignored[name] = why

    def check_complete(self) -> None:
        routed = {o for m in self.stages.values() for o in m.values()} | set(self.ignored)
        left = sorted(set(self.source.shapes) - routed)
        if left:
            raise ConvertError(f"official tensor '{left[0]}' in {self.source.files[left[0]].name} is neither mapped "
                               f"nor ignored" + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))


# ---------------------------------------------------------------------------------- families

PLANNER_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                 "chat_template.jinja", "generation_config.json", "und_generation_config.json")


def _official_mammothmoda2_config(src: Path, backbone: str) -> dict[str, Any]:
    """The top-level official ``config.json``, checked to be of the named planner backbone."""
    config = _read_json(src / "config.json")
    for key in ("llm_config", "gen_dit_config", "gen_vae_config"):
        if not isinstance(config.get(key), dict):
            raise ConvertError(f"{src / 'config.json'}: missing '{key}' (is this a MammothModa2 checkpoint?)")
    llm_type = str(config["llm_config"].get("model_type", ""))
    if ("qwen2_5_vl" in llm_type) != (backbone == "qwen2_5_vl"):
        want = "mammothmoda2-preview" if "qwen2_5_vl" in llm_type else "mammothmoda2"
        raise ConvertError(f"{src / 'config.json'}: llm_config.model_type {llm_type!r} is not a {backbone} planner "
                           f"(convert it with --from {want})")
    return config


def _preview_dit_names(dit_cfg: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The DiT mapping of a Preview checkpoint: its top-level QFormer seen under the DiT's prefix."""
    seen: dict[str, str] = {}  # name as the DiT table reads it -> the official name
    for name in shapes:
        view = name
        for prefix, ours in PREVIEW_REFINER_PREFIXES.items():
            if name.startswith(prefix):
                view = ours + name[len(prefix):]
        if view in seen:
            raise ConvertError(f"official tensors '{seen[view]}' and '{name}' are the same DiT tensor")
        seen[view] = name
    try:
        mapping = dit_official.map_names(dit_cfg, {view: shapes[name] for view, name in seen.items()})
    except ValueError as exc:  # name the tensor as the checkpoint does
        message = str(exc)
        for prefix, ours in PREVIEW_REFINER_PREFIXES.items():
            message = message.replace(ours, prefix)
        raise ConvertError(message) from exc
    return {ours: seen[view] for ours, view in mapping.items()}


def _convert_mammothmoda2(src: Path, dst: Path, shard_bytes: int, *, preview: bool = False,
                          **_: Any) -> dict[str, Any]:
    """MammothModa2-Dev (Qwen3-VL planner, MammothTok) or -Preview (``preview``: Qwen2.5-VL
    planner, the DiT's QFormer at the planner width beside it, no MammothTok)."""
    source = "mammothmoda2-preview" if preview else "mammothmoda2"
    config = _official_mammothmoda2_config(src, "qwen2_5_vl" if preview else "qwen3_vl")
    plan = Plan(TensorSource(src))
    shapes = plan.source.shapes
    dtype = config.get("torch_dtype")

    try:
        planner_cfg = planner_config_from_official(config["llm_config"], gen_vocab=True, dtype=dtype)
        planner_map = official_planner_names(list(shapes), qwen25_legacy=preview)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    check_mapping("planner", planner_map, planner_expected(planner_cfg), shapes)
    plan.route("planner", planner_map)
    try:
        dit_cfg = dit_official.mammoth2_config(config)
        if preview:
            dit_cfg = type(dit_cfg).from_dict({**dit_cfg.to_dict(), "image_refiner_at_llm_width": True})
            plan.route("dit", _preview_dit_names(dit_cfg, shapes))
        else:
            plan.route("dit", dit_official.map_names(dit_cfg, shapes))
        vae_cfg = vae_official.vae_config("mammothmoda2", config)
        plan.route("vae", vae_official.map_names("mammothmoda2", vae_cfg, shapes))
        tok_cfg = None
        if not preview:
            tok_cfg = tok_official.tokenizer_config(shapes)
            plan.route("mammothtok", tok_official.map_names(tok_cfg, shapes))
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    plan.ignore(IGNORED[source])
    plan.check_complete()

    planner_dir = dst / "planner"
    _write_json(planner_dir / "config.json", planner_cfg)
    _copy_files(src, planner_dir, ("t2i_generation_config.json",), required=("t2i_generation_config.json",))
    copied = _copy_files(src, planner_dir, PLANNER_FILES + ("mammothu_vision_tokens.txt",))
    if "preprocessor_config.json" in copied and "video_preprocessor_config.json" not in copied:
        _write_video_processor_config(planner_dir, "Qwen2VLVideoProcessor" if preview else "Qwen3VLVideoProcessor")
    layout = TokenLayout.from_checkpoint(planner_dir)  # ids from the checkpoint's own files
    write_tokenizer_from_official(src, planner_dir, layout)
    # The Preview code conditions on the last (normed) hidden state, the Dev code on the
    # average of ``gen_condition_layers``.
    layers = PREVIEW_CONDITION_LAYERS if preview else (config.get("gen_condition_layers")
                                                       or DEFAULT_CONDITION_LAYERS)
    settings = {"mode": "mammoth2", "condition_layers": list(layers)}
    _write_json(planner_dir / "planner_settings.json", settings)
    write_tensors(plan.source, plan.stages["planner"], planner_dir, "model", shard_bytes)

    _write_json(dst / "dit" / "config.json", dit_cfg.to_dict())
    write_tensors(plan.source, plan.stages["dit"], dst / "dit", "diffusion_pytorch_model", shard_bytes)
    _write_json(dst / "vae" / "config.json", vae_cfg)
    write_tensors(plan.source, plan.stages["vae"], dst / "vae", "diffusion_pytorch_model", shard_bytes)
    if tok_cfg is not None:
        tok_dir = dst / "vae" / tok_official.SUBFOLDER
        _write_json(tok_dir / "config.json", tok_cfg.to_dict())
        write_tensors(plan.source, plan.stages["mammothtok"], tok_dir, "model", shard_bytes)

    gen = _read_json(planner_dir / "t2i_generation_config.json")
    vae_spatial = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    defaults = {
        "vae_spatial_compression": vae_spatial, "patch_size": dit_cfg.patch_size,
        "ar_temperature": float(gen.get("temperature") or 1.0), "ar_top_k": int(gen.get("top_k") or 0),
        "ar_top_p": float(gen.get("top_p") or 1.0),
        "visual_token_start_id": layout.visual_start_id, "num_visual_tokens": layout.num_visual_codes,
        "eol_token_id": layout.eol_id,
    }
    preset = get_preset("mammoth2-preview" if preview else "mammoth2-dev")
    return {"family": preset.family, "preset": preset.name, "defaults": defaults, "plan": plan,
            "stages": {"planner": "planner", "dit": "dit", "vae": "vae"}}


def _convert_mammothmoda25(src: Path, dst: Path, shard_bytes: int,
                           dit_overrides: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
    pipeline = _read_json(src / "model_index.json") if (src / "model_index.json").is_file() else {}
    if pipeline.get("boundary_ratio") is not None or pipeline.get("transformer_2") not in (None, [None, None]):
        raise ConvertError(f"{src / 'model_index.json'}: two-transformer (boundary_ratio) checkpoints are not served")
    if pipeline.get("expand_timesteps"):
        raise ConvertError(f"{src / 'model_index.json'}: expand_timesteps checkpoints are not served")
    parts = {name: src / name for name in ("text_encoder", "transformer", "vae")}
    for name, path in parts.items():
        if not (path / "config.json").is_file():
            raise ConvertError(f"{src}: missing {name}/config.json (is this a MammothModa2.5 checkpoint?)")
    sources = {name: TensorSource(path) for name, path in parts.items()}

    text_cfg = _read_json(parts["text_encoder"] / "config.json")
    planner_cfg = planner_config_from_official(text_cfg, gen_vocab=False, dtype=text_cfg.get("torch_dtype"))
    text_shapes = sources["text_encoder"].shapes
    planner_map = {n: n for n in text_shapes}
    check_mapping("planner", planner_map, planner_expected(planner_cfg), text_shapes)
    try:
        dit_cfg = dit_official.mammoth25_config(_read_json(parts["transformer"] / "config.json"),
                                                sources["transformer"].shapes, overrides=dit_overrides)
        dit_map = dit_official.map_names(dit_cfg, sources["transformer"].shapes)
        vae_cfg = vae_official.vae_config("mammothmoda25", _read_json(parts["vae"] / "config.json"))
        vae_map = vae_official.map_names("mammothmoda25", vae_cfg, sources["vae"].shapes)
    except ValueError as exc:
        raise ConvertError(str(exc)) from exc
    plans = {}
    for part, stage, mapping in (("text_encoder", "planner", planner_map), ("transformer", "dit", dit_map),
                                 ("vae", "vae", vae_map)):
        plan = Plan(sources[part])
        plan.route(stage, mapping)
        plan.check_complete()
        plans[stage] = plan
    glyph, ignored = _glyph_encoder_plan(src, dit_cfg)

    planner_dir = dst / "planner"
    _write_json(planner_dir / "config.json", planner_cfg)
    tok_src = src / "tokenizer"
    copied = _copy_files(tok_src, planner_dir, ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                                                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                                                "chat_template.json"), required=("tokenizer_config.json",))
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise ConvertError(f"{tok_src}: no tokenizer.json or vocab.json")
    _copy_files(parts["text_encoder"], planner_dir, ("generation_config.json",))
    processors = ("preprocessor_config.json", "video_preprocessor_config.json")
    copied = _copy_files(tok_src, planner_dir, processors) or _copy_files(parts["text_encoder"], planner_dir, processors)
    if "preprocessor_config.json" not in copied:
        # The pipeline only encodes text, but vLLM builds the Qwen3-VL processor: its image half
        # from the text encoder's own vision config (Qwen3-VL's processor defaults otherwise).
        vision = planner_cfg["vision_config"]
        _write_json(planner_dir / "preprocessor_config.json", {
            "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
            "patch_size": vision.get("patch_size", 16), "temporal_patch_size": vision.get("temporal_patch_size", 2),
            "merge_size": vision.get("spatial_merge_size", 2), "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216}})
    if "video_preprocessor_config.json" not in copied:
        _write_video_processor_config(planner_dir)
    _write_json(planner_dir / "planner_settings.json", {"mode": "mammoth25", "prompt_max_length": dit_cfg.text_len})
    write_tensors(plans["planner"].source, planner_map, planner_dir, "model", shard_bytes)

    _write_json(dst / "dit" / "config.json", dit_cfg.to_dict())
    write_tensors(plans["dit"].source, dit_map, dst / "dit", "diffusion_pytorch_model", shard_bytes)
    scheduler = src / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise ConvertError(f"{src}: missing scheduler/scheduler_config.json (the flow shift)")
    _copy_files(scheduler.parent, dst / "dit" / "scheduler", ("scheduler_config.json",))
    _write_json(dst / "vae" / "config.json", vae_cfg)
    write_tensors(plans["vae"].source, vae_map, dst / "vae", "diffusion_pytorch_model", shard_bytes)

    preset = "mammoth25-6b-a1b" if dit_cfg.num_attention_heads == 12 else "mammoth25-20b-a3b"
    defaults = {"vae_spatial_compression": int(vae_cfg.get("scale_factor_spatial", 8)),
                "patch_size": int(dit_cfg.patch_size[1]),
                "flow_shift": float(_read_json(scheduler).get("shift", 1.0))}
    if glyph is not None:  # the DiT's condition encoder for quoted text, beside the DiT
        glyph_dir = dst / "dit" / glyph_models.SUBFOLDER
        _write_json(glyph_dir / "config.json", glyph["config"])
        write_tensors(glyph["plan"].source, glyph["plan"].stages["glyph_encoder"], glyph_dir,
                      glyph_models.WEIGHTS_STEM, shard_bytes)
        _copy_files(src / "tokenizer_2", glyph_dir, glyph_models.TOKENIZER_FILES)
        defaults["glyph_text"] = True  # the ingress hands quoted text to the DiT stage
        ignored.update(glyph["plan"].ignored)
    merged = Plan(sources["transformer"], ignored=ignored)
    merged.stages = {s: p.stages[s] for s, p in plans.items()}
    if glyph is not None:
        merged.stages["glyph_encoder"] = glyph["plan"].stages["glyph_encoder"]
    return {"family": "mammoth25", "preset": preset, "defaults": defaults, "plan": merged,
            "stages": {"planner": "planner", "dit": "dit", "vae": "vae"}}


def _glyph_encoder_plan(src: Path, dit_cfg: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The official ByT5 ``text_encoder_2/`` (+ ``tokenizer_2/``) -> the DiT's glyph encoder, when
    the DiT has its ``byt5_in`` mapper (as the official pipeline uses it only then); otherwise
    those folders are ignored with the reason."""
    parts = [p for p in ("text_encoder_2", "tokenizer_2") if (src / p).is_dir()]
    if not dit_cfg.enable_byt5:
        return None, {f"{p}/": "ByT5 glyph encoder: the DiT has no byt5_in mapper (enable_byt5 off), "
                               "so the official pipeline does not use it" for p in parts}
    encoder_dir = src / "text_encoder_2"
    if not (encoder_dir / "config.json").is_file():
        raise ConvertError(f"{src}: the DiT has a ByT5 mapper (byt5_in.*) but text_encoder_2/config.json is missing")
    config = {k: v for k, v in _read_json(encoder_dir / "config.json").items() if k != "_name_or_path"}
    try:
        t5 = glyph_models.t5_config(config)
    except ValueError as exc:
        raise ConvertError(f"{encoder_dir / 'config.json'}: {exc}") from exc
    if t5.d_model != BYT5_DIM:
        raise ConvertError(f"{encoder_dir / 'config.json'}: d_model {t5.d_model}, the DiT's byt5_in takes {BYT5_DIM}")
    plan = Plan(TensorSource(encoder_dir))
    try:
        mapping = dit_official.glyph_encoder_names(t5, plan.source.shapes)
    except ValueError as exc:
        raise ConvertError(f"text_encoder_2: {exc}") from exc
    plan.route("glyph_encoder", mapping)
    aliases = {a: f"tied alias of {n} (the same tensor)" for a, n in dit_official.GLYPH_TIED_ALIAS.items()
               if a not in mapping.values()}
    plan.ignore(aliases)
    plan.check_complete()
    return {"plan": plan, "config": config}, {}


def _convert_mammothmoda2_preview(src: Path, dst: Path, shard_bytes: int, **kw: Any) -> dict[str, Any]:
    return _convert_mammothmoda2(src, dst, shard_bytes, preview=True, **kw)


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "mammothmoda2": _convert_mammothmoda2,
    "mammothmoda2-preview": _convert_mammothmoda2_preview,
    "mammothmoda25": _convert_mammothmoda25,
}


def convert(src: str | Path, dst: str | Path, source: str, *, overwrite: bool = False,
            shard_bytes: int = DEFAULT_SHARD_BYTES, dit_overrides: dict[str, Any] | None = None) -> ModelIndex:
    """Convert the official checkpoint ``src`` (format ``source``) into the model directory ``dst``."""
    if source not in CONVERTERS:
        raise ConvertError(f"--from: unknown source {source!r}; choose one of {sorted(CONVERTERS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ConvertError(f"{dst}: exists and is not empty (pass --force)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = CONVERTERS[source](src, dst, shard_bytes, dit_overrides=dit_overrides)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # never leave a half-written model directory
        raise
    preset = get_preset(result["preset"])
    plan: Plan = result["plan"]
    index = {
        "_class_name": "MammothServeModel",
        "format_version": FORMAT_VERSION,
        "family": result["family"],
        "preset": preset.name,
        "tasks": list(preset.tasks),
        "defaults": {**preset.defaults, **result["defaults"]},
        "stages": result["stages"],
        "source": {"format": source, "path": str(src.resolve())},
        "tensors": {stage: len(m) for stage, m in plan.stages.items()},
        "ignored": _summarise(plan.ignored),
    }
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return read_index(dst)


def _summarise(ignored: dict[str, str]) -> dict[str, int]:
    """Reason -> how many official tensors (or folders) were left out for it."""
    return dict(Counter(ignored.values()))
