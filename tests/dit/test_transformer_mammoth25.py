"""MammothModa2.5 MoE DiT: shapes, batching without padding effects, prepare/forward split,
checkpoint round trip, refiner padding semantics and preset sizes."""

import math

import pytest
import torch

from dit_worker.checkpoint import from_pretrained, save_pretrained
from dit_worker.models.mammoth25_refiner import RefinerInputs
from dit_worker.models.transformer_mammoth25 import (
    Mammoth25Condition,
    Mammoth25DiTConfig,
    Mammoth25Transformer,
    count_parameters,
)

CFG = Mammoth25DiTConfig.tiny()
VLM = CFG.refiner.vlm_dim


def latent_frames(pixel_frames: int) -> int:
    assert (pixel_frames - 1) % 4 == 0, "video frames are 4k+1"
    return (pixel_frames - 1) // 4 + 1


@pytest.fixture(scope="module")
def model() -> Mammoth25Transformer:
    torch.manual_seed(0)
    m = Mammoth25Transformer(CFG).eval()
    with torch.no_grad():  # random, not zero, selection biases and a non-trivial model
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for block in m.blocks:
            block.ffn.router.expert_bias.normal_(std=0.1)
    return m


def run(model, conditions, latents, timestep):
    with torch.no_grad():
        return model(latents, timestep, model.prepare(conditions))


@pytest.mark.parametrize("pixel_frames,height,width", [(1, 64, 96), (9, 64, 32)])
def test_t2v_and_editing_shapes(model, pixel_frames, height, width):
    f, h, w = latent_frames(pixel_frames), height // 16, width // 16  # 16x: the 48-ch Wan2.2 VAE
    latents = torch.randn(2, CFG.in_channels, f, h, w)
    source = torch.randn(CFG.in_channels, f, h, w)
    conditions = [Mammoth25Condition(prompt=torch.randn(5, VLM)),
                  Mammoth25Condition(prompt=torch.randn(9, VLM), source_latents=source)]
    out = run(model, conditions, latents, torch.tensor([999.0, 250.0]))
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_latents_must_fit_the_patch_grid(model):
    latents = torch.randn(1, CFG.in_channels, 1, 4, 3)
    with pytest.raises(ValueError, match="patch"):
        run(model, [Mammoth25Condition(prompt=torch.randn(2, VLM))], latents, torch.tensor([1.0]))


def test_padded_batch_equals_individual_runs(model):
    torch.manual_seed(1)
    latents = torch.randn(4, CFG.in_channels, 2, 4, 6)
    timestep = torch.tensor([980.0, 500.0, 500.0, 20.0])
    source = torch.randn(CFG.in_channels, 2, 4, 6)
    conditions = [Mammoth25Condition(prompt=torch.randn(13, VLM)),
                  Mammoth25Condition(prompt=torch.randn(2, VLM), source_latents=source),
                  Mammoth25Condition(prompt=torch.zeros(0, VLM), source_latents=source),  # empty negative
                  Mammoth25Condition(prompt=torch.randn(CFG.text_len + 7, VLM))]  # cut to text_len
    batched = run(model, conditions, latents, timestep)
    for i, condition in enumerate(conditions):
        alone = run(model, [condition], latents[i:i + 1], timestep[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # a subset selected from a prepared cohort
        prepared = model.prepare(conditions).select([3, 1])
        subset = model(latents[[3, 1]], timestep[[3, 1]], prepared)
    torch.testing.assert_close(subset, batched[[3, 1]], atol=2e-5, rtol=1e-5)


def test_padding_never_reaches_the_experts(model):
    latents = torch.randn(2, CFG.in_channels, 1, 4, 4)  # 4 video tokens per row
    conditions = [Mammoth25Condition(prompt=torch.randn(3, VLM)), Mammoth25Condition(prompt=torch.randn(10, VLM))]
    run(model, conditions, latents, torch.tensor([500.0, 500.0]))
    real_tokens = (4 + 3) + (4 + 10)
    counts = model.expert_counts()
    assert len(counts) == CFG.num_layers
    assert all(sum(c) == real_tokens * CFG.moe.moe_router_topk for c in counts.values())


def test_prepare_is_timestep_independent(model):
    conditions = [Mammoth25Condition(prompt=torch.randn(6, VLM), source_latents=torch.randn(CFG.in_channels, 2, 4, 4))]
    latents = torch.randn(1, CFG.in_channels, 2, 4, 4)
    with torch.no_grad():
        prepared = model.prepare(conditions)
        extra = prepared.extra.clone()
        for t in (1000.0, 431.0, 1.0):
            reused = model(latents, torch.tensor([t]), prepared)
            fresh = run(model, conditions, latents, torch.tensor([t]))
            torch.testing.assert_close(reused, fresh, atol=0, rtol=0)
    assert torch.equal(prepared.extra, extra)
    assert not torch.allclose(run(model, conditions, latents, torch.tensor([1000.0])),
                              run(model, conditions, latents, torch.tensor([1.0])))


def test_prompt_mask_keeps_only_real_tokens(model):
    prompt = torch.randn(8, VLM)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    latents = torch.randn(1, CFG.in_channels, 1, 4, 4)
    t = torch.tensor([700.0])
    masked = run(model, [Mammoth25Condition(prompt=prompt, prompt_mask=mask)], latents, t)
    torch.testing.assert_close(masked, run(model, [Mammoth25Condition(prompt=prompt[:5])], latents, t))


def test_refiner_collapsed_padding_equals_explicit_padding(model):
    """The official refiner sees the prompt zero-padded to ``text_len`` without a mask."""
    refiner = model.converter_mlp
    prompts = [torch.randn(5, VLM), torch.randn(CFG.text_len, VLM), torch.zeros(0, VLM)]
    inputs = RefinerInputs.build(prompts, CFG.text_len, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        collapsed = refiner(inputs.states, inputs.key_bias)
        for i, p in enumerate(prompts):
            padded = torch.zeros(1, CFG.text_len, VLM)
            padded[0, : p.shape[0]] = p
            explicit = refiner(padded, torch.zeros(1, 1, 1, CFG.text_len))
            n = p.shape[0]
            torch.testing.assert_close(collapsed[i, :n], explicit[0, :n], atol=1e-5, rtol=1e-5)
            if n < CFG.text_len:  # the one slot stands for every padding position
                torch.testing.assert_close(collapsed[i, -1], explicit[0, -1], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(model, tmp_path):
    save_pretrained(model, CFG, tmp_path)
    loaded = from_pretrained(Mammoth25Transformer, Mammoth25DiTConfig, tmp_path)
    assert loaded.config == CFG
    conditions = [Mammoth25Condition(prompt=torch.randn(4, VLM), source_latents=torch.randn(CFG.in_channels, 1, 4, 4))]
    latents = torch.randn(1, CFG.in_channels, 1, 4, 4)
    t = torch.tensor([321.0])
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Same weights; the loader's mmap'd tensors are aligned differently, so SIMD sums may differ
    # in the last bit.
    torch.testing.assert_close(run(loaded, conditions, latents, t), run(model, conditions, latents, t),
                               atol=2e-6, rtol=0)


def test_official_weight_names():
    keys = set(Mammoth25Transformer(CFG).state_dict())
    for name in ["patch_embedding.weight", "condition_embedder.time_embedder.linear_1.weight",
                 "condition_embedder.time_proj.weight", "blocks.0.scale_shift_table", "blocks.1.attn1.to_out.0.bias",
                 "blocks.0.attn1.norm_q.weight", "blocks.0.ffn.router.weight", "blocks.0.ffn.router.expert_bias",
                 "blocks.0.ffn.experts.weight1", "blocks.0.ffn.shared_experts.weight2", "proj_out.weight",
                 "scale_shift_table", "converter_mlp.connector.0.weight", "converter_mlp.connector.2.bias",
                 "converter_mlp.connector.3.self_attn.in_proj_weight", "converter_mlp.connector.4.ffn.3.weight",
                 "converter_mlp.connector.4.norm2.weight", "in_context_proj.weight", "vlm_pos_embed"]:
        assert name in keys, name
    m = CFG.moe
    shapes = Mammoth25Transformer(CFG).state_dict()
    assert shapes["blocks.0.ffn.experts.weight1"].shape == (CFG.inner_dim, m.num_moe_experts * m.ffn_hidden_size)
    assert shapes["blocks.0.ffn.shared_experts.weight1"].shape == (m.shared_expert_intermediate_size, CFG.inner_dim)


def test_bf16_keeps_time_embedding_and_bias_fp32():
    model = Mammoth25Transformer(CFG).to(torch.bfloat16)
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.blocks[0].ffn.router.expert_bias.dtype == torch.float32
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    latents = torch.randn(1, CFG.in_channels, 1, 4, 4, dtype=torch.bfloat16)
    prepared = model.prepare([Mammoth25Condition(prompt=torch.randn(3, VLM, dtype=torch.bfloat16))])
    with torch.no_grad():
        assert torch.isfinite(model(latents, torch.tensor([500.0]), prepared)).all()


def test_config_round_trip():
    for cfg in (CFG, Mammoth25DiTConfig.a6b_a1b(), Mammoth25DiTConfig.a20b_a3b()):
        assert Mammoth25DiTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("preset,total,active", [("a6b_a1b", 6e9, 1.2e9), ("a20b_a3b", 20e9, 3e9)])
def test_preset_sizes_match_their_names(preset, total, active):
    counts = count_parameters(getattr(Mammoth25DiTConfig, preset)())
    # The names count the DiT backbone; the refiner (~0.24B) comes on top.
    assert math.isclose(counts["backbone_total"], total, rel_tol=0.15)
    assert math.isclose(counts["backbone_active"], active, rel_tol=0.15)
    assert counts["total"] == counts["backbone_total"] + counts["refiner"]
    assert 0.2e9 < counts["refiner"] < 0.3e9
