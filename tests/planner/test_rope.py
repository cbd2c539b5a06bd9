"""The planner's once-per-forward M-RoPE rotates exactly as vLLM's own ``MRotaryEmbedding``."""

from __future__ import annotations

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope

from planner import rope as once
from planner.rope import OncePerForwardMRope

HEAD, HEADS, KV_HEADS = 32, 4, 2


@pytest.fixture(scope="module")
def mrope():
    with set_current_vllm_config(VllmConfig()):
        return get_rope(HEAD, max_position=4096, is_neox_style=True,
                        rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5],
                                         "mrope_interleaved": True, "rope_theta": 5e6})


def _qk(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HEADS * HEAD, generator=g), torch.randn(tokens, KV_HEADS * HEAD, generator=g)


def test_every_layer_rotates_like_vllm_and_a_new_forward_rebuilds_the_table(mrope):
    wrapped = OncePerForwardMRope.wrap(mrope)
    assert OncePerForwardMRope.wrap(mrope) is wrapped  # one wrapper for the instance all layers share
    positions = torch.zeros(3, 16, dtype=torch.long)  # vLLM reuses one positions buffer in place
    for step in range(3):
        positions.copy_(torch.randint(0, 3000, (3, 16), generator=torch.Generator().manual_seed(step)))
        once.new_forward()
        for layer in range(2):  # the second layer reuses the first one's table
            q, k = _qk(16, 10 * step + layer)
            want_q, want_k = mrope.forward_native(positions, q.clone(), k.clone())
            got_q, got_k = wrapped(positions, q.clone(), k.clone())
            torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_text_positions_and_plain_rope_take_vllms_own_path(mrope):
    with set_current_vllm_config(VllmConfig()):
        plain = get_rope(HEAD, max_position=4096, is_neox_style=True, rope_parameters={"rope_theta": 1e4})
    assert OncePerForwardMRope.wrap(plain) is plain
    wrapped = OncePerForwardMRope.wrap(mrope)
    positions = torch.arange(8)
    q, k = _qk(8, 1)
    want_q, want_k = mrope.forward_native(positions, q.clone(), k.clone())
    got_q, got_k = wrapped(positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
