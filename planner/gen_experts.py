"""What every MammothModa2 planner adds to its vLLM base model, whatever the backbone.

The Qwen3-VL planner (``model``) and the Qwen2.5-VL planner (``model_qwen25``) differ only in
the vLLM classes they extend; the generation parts are the same and live here as mixins:

* ``GenExpertLayer``  -- a decoder layer with ``gen_mlp`` in the layers ``moe_type`` names;
  a token takes it iff its id is in the generation vocabulary (``GenRouting``).
* ``GenVocabModel``   -- the text model: ``gen_embed_tokens``, the routed layer loop and the
  hidden-state capture of exporting requests (``_Capture``, written in the generating pass).
* ``GenHeadLM``       -- the causal LM: logits ``[lm_head | gen_head]``; grid rows compute only
  ``gen_head``.
* ``GenMaskCarrier``  -- the multimodal wrapper: vLLM calls ``embed_input_ids(ids)`` then
  ``forward(input_ids=None, inputs_embeds=...)``, so the routing mask is taken from the ids
  in ``embed_input_ids`` and carried to ``forward`` (never silently dropped).
"""

from __future__ import annotations

import os
from itertools import islice

import torch
from torch import nn
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from . import rope
from .configuration import moe_layer_enabled
from .rope import OncePerForwardMRope
from .runtime import get_runtime, hidden_index_sets, write_captured


class GenRouting:
    """Token indices of one forward pass, split by expert; computed once, used by every layer."""

    def __init__(self, gen_mask: torch.Tensor | None):
        self.gen_idx = self.und_idx = None
        self.n_gen = 0 if gen_mask is None else int(gen_mask.sum())
        self.n_total = 0 if gen_mask is None else gen_mask.numel()
        if 0 < self.n_gen < self.n_total:
            self.gen_idx = gen_mask.nonzero(as_tuple=True)[0]
            self.und_idx = (~gen_mask).nonzero(as_tuple=True)[0]

    def apply(self, x: torch.Tensor, mlp: nn.Module, gen_mlp: nn.Module | None) -> torch.Tensor:
        if gen_mlp is None or self.n_gen == 0:
            return mlp(x)
        if self.n_gen == self.n_total:
            return gen_mlp(x)
        out = torch.empty_like(x)
        out[self.und_idx] = mlp(x[self.und_idx])
        out[self.gen_idx] = gen_mlp(x[self.gen_idx])
        return out


class GenExpertLayer(nn.Module):
    """Mixin placed before a vLLM decoder layer class (pre-norm, fused residual norms)."""

    gen_mlp: nn.Module | None

    def init_gen_mlp(self, config, quant_config, prefix: str) -> None:
        # every layer rotates with the M-RoPE table its forward's first layer built (CPU)
        self.self_attn.rotary_emb = OncePerForwardMRope.wrap(self.self_attn.rotary_emb)
        layer_idx = extract_layer_index(prefix)
        self.gen_mlp = (
            Qwen2MLP(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                hidden_act=config.hidden_act,
                quant_config=quant_config,
                prefix=f"{prefix}.gen_mlp",
            )
            if moe_layer_enabled(getattr(config, "moe_type", "none"), layer_idx)
            else None
        )

    def forward(self, positions, hidden_states, residual, routing: GenRouting | None = None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        if routing is None:
            hidden_states = self.mlp(hidden_states)
        else:
            hidden_states = routing.apply(hidden_states, self.mlp, self.gen_mlp)
        return hidden_states, residual


class GenVocabModel(nn.Module):
    """Mixin for a vLLM text model (``embed_tokens``, ``layers``, ``norm``, pp bounds).

    Its forward does data-dependent routing, reads the batch layout and writes shared memory:
    it must run eagerly, so ``PlannerConfig`` refuses ``enforce_eager=False`` (a
    ``support_torch_compile`` wrapper inherited from the base class is then inert).
    """

    def init_gen_vocab(self, prefix: str) -> None:
        config = self.config
        self.gen_vocab_start_index = int(config.gen_vocab_start_index)
        self.extra_gen_vocab = bool(getattr(config, "extra_gen_vocab", True))
        if self.extra_gen_vocab:
            self.gen_embed_tokens = VocabParallelEmbedding(
                config.gen_vocab_size, config.hidden_size, prefix=f"{prefix}.gen_embed_tokens"
            )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.extra_gen_vocab:
            return self.embed_tokens(input_ids)
        gen = input_ids >= self.gen_vocab_start_index
        embeds = self.embed_tokens(input_ids.masked_fill(gen, 0))
        if bool(gen.any()):
            gen_ids = (input_ids - self.gen_vocab_start_index).clamp(min=0)
            embeds = torch.where(gen.unsqueeze(-1), self.gen_embed_tokens(gen_ids), embeds)
        return embeds

    def run_layers(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None,
        gen_mask: torch.Tensor | None,
        deepstack_input_embeds: IntermediateTensors | None = None,
    ):
        """Embed, run the routed layers (adding Qwen3-VL's deepstack features where given),
        capture the exported layers, final norm."""
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        if gen_mask is None and input_ids is not None:
            gen_mask = input_ids >= self.gen_vocab_start_index
        routing = GenRouting(gen_mask)
        num_layers = self.config.num_hidden_layers
        rope.new_forward()
        note_batch()
        capture = _Capture.begin(num_layers)
        if capture is not None:
            capture.add(0, hidden_states, residual)
        for layer_idx, layer in islice(enumerate(self.layers), self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual, routing)
            if deepstack_input_embeds is not None and layer_idx < len(deepstack_input_embeds):
                hidden_states = hidden_states + deepstack_input_embeds[f"deepstack_input_embeds_{layer_idx}"]
            if capture is not None and layer_idx + 1 < num_layers:
                # (index num_layers is the *normed* final output, added below)
                capture.add(layer_idx + 1, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        if capture is not None:
            capture.add(num_layers, hidden_states, None)
            capture.flush()
        return hidden_states


def note_batch() -> None:
    """Record this step's per-row sequence lengths for the logits processor and the capture."""
    runtime = get_runtime()
    if not runtime.rows:
        runtime.note_batch(None, None)
        return
    first = None
    if is_forward_context_available():
        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            meta = meta[0] if meta else None
        if meta:
            first = next(iter(meta.values())) if isinstance(meta, dict) else meta
    qsl = getattr(first, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = getattr(first, "query_start_loc", None)
    seq_lens = getattr(first, "seq_lens_cpu", None)
    if seq_lens is None:
        seq_lens = getattr(first, "seq_lens", None)
    runtime.note_batch(qsl.tolist() if qsl is not None else None, seq_lens.tolist() if seq_lens is not None else None)


class _Capture:
    """Running per-group sums of the requested hidden states for this forward pass."""

    def __init__(self, num_layers: int, groups, rows, spans):
        self.num_layers = num_layers
        self.groups = groups  # layer tuple -> row indices
        self.rows = rows  # row index -> RowState
        self.spans = spans  # row index -> (start, end, sequence offset) of its tokens in this batch
        self.sums: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def begin(cls, num_layers: int) -> _Capture | None:
        runtime = get_runtime()
        if runtime.tp_rank != 0 or not runtime.rows:
            return None
        rows = runtime.capture_rows()
        qsl = runtime.query_start_loc
        if not rows or qsl is None or runtime.seq_lens is None:
            return None
        spans = {}
        for i, _ in rows:
            offset = runtime.chunk_offset(i)
            if offset is not None:
                spans[i] = (qsl[i], qsl[i + 1], offset)
        rows = [(i, r) for i, r in rows if i in spans]
        if not rows:
            return None
        return cls(num_layers, hidden_index_sets(rows, num_layers), dict(rows), spans)

    def add(self, k: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        full = None
        for layers in self.groups:
            if k in layers:
                if full is None:
                    full = hidden if residual is None else hidden + residual
                acc = self.sums.get(layers)
                self.sums[layers] = full.float() if acc is None else acc + full.float()

    def flush(self) -> None:
        for layers, idx in self.groups.items():
            total = self.sums.get(layers)
            if total is None:
                continue
            mean = total / len(layers)
            for i in idx:
                start, end, offset = self.spans[i]
                if end > start:
                    write_captured(self.rows[i], mean[start:end], offset)


class GenHeadLM(nn.Module):
    """Mixin for a vLLM causal LM: ``lm_head`` + ``gen_head``, text head skipped on grid rows."""

    def init_heads(self, config) -> None:
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.extra_gen_vocab = bool(getattr(config, "extra_gen_vocab", True))
        self.gen_vocab_start_index = int(config.gen_vocab_start_index)
        if self.extra_gen_vocab:
            self.gen_head = ParallelLMHead(config.gen_vocab_size, config.hidden_size, prefix="gen_head")
            self.gen_logits_processor = LogitsProcessor(config.gen_vocab_size)
        # Benchmark switch: compute the full [lm_head | gen_head] for grid rows too.
        self.grid_logits = os.environ.get("MAMMOTH_PLANNER_FULL_LOGITS", "0") != "1"

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if not self.extra_gen_vocab:
            return self.logits_processor(self.lm_head, hidden_states)
        n = hidden_states.shape[0]
        grid = get_runtime().grid_rows(n, hidden_states.device) if self.grid_logits else None
        width = self.gen_vocab_start_index + self.config.gen_vocab_size
        if grid is not None and bool(grid.all()):
            # Every row samples on the visual grid: the text head is never computed.
            gen = self.gen_logits_processor(self.gen_head, hidden_states)
            if gen is None:
                return None
            logits = gen.new_full((n, width), float("-inf"))
            logits[:, self.gen_vocab_start_index:] = gen
            return logits
        if grid is not None:
            text_rows = (~grid).nonzero(as_tuple=True)[0]
            gen = self.gen_logits_processor(self.gen_head, hidden_states)
            text = self.logits_processor(self.lm_head, hidden_states[text_rows])
            if gen is None:
                return None
            logits = gen.new_full((n, width), float("-inf"))
            logits[:, self.gen_vocab_start_index:] = gen
            logits[text_rows, : text.shape[1]] = text
            return logits
        text = self.logits_processor(self.lm_head, hidden_states)
        gen = self.gen_logits_processor(self.gen_head, hidden_states)
        if text is None or gen is None:
            return None
        if text.shape[1] == self.gen_vocab_start_index:
            return torch.cat([text, gen], dim=-1)
        # vocab_size < gen_vocab_start_index: ids in the gap do not exist.
        logits = gen.new_full((n, width), float("-inf"))
        logits[:, : text.shape[1]] = text
        logits[:, self.gen_vocab_start_index:] = gen
        return logits


class GenMaskCarrier(nn.Module):
    """Mixin placed before a vLLM multimodal model class whose ``language_model`` is a
    ``GenHeadLM`` over a ``GenVocabModel``."""

    _pending_gen_mask: torch.Tensor | None = None

    def init_gen_mask(self, gen_vocab_start_index: int) -> None:
        self.gen_vocab_start_index = int(gen_vocab_start_index)
        self._pending_gen_mask = None
        try:
            from vllm.distributed import get_tensor_model_parallel_rank

            get_runtime().tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # pragma: no cover
            pass

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        # Record the routing mask while the ids are still known: forward() only gets embeddings.
        self._pending_gen_mask = input_ids >= self.gen_vocab_start_index
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def gen_mask_for(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
        """The routing mask of this forward pass (from the ids, else the one carried over)."""
        gen_mask = None
        if input_ids is not None:
            gen_mask = input_ids >= self.gen_vocab_start_index
        elif inputs_embeds is not None:
            gen_mask = self._take_gen_mask(inputs_embeds.shape[0], inputs_embeds.device)
        self._pending_gen_mask = None
        return gen_mask

    def _take_gen_mask(self, num_tokens: int, device) -> torch.Tensor:
        mask = self._pending_gen_mask
        if mask is None:
            # Only vLLM's dummy/profiling runs feed embeddings without embedding ids first.
            return torch.zeros(num_tokens, dtype=torch.bool, device=device)
        if mask.shape[0] < num_tokens:  # padded batch: padding rows are not gen tokens
            mask = torch.cat([mask, mask.new_zeros(num_tokens - mask.shape[0])])
        return mask[:num_tokens].to(device)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)
