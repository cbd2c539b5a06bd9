"""bench.dit_gpu on CPU: its FLOP model against torch's counter, and one small case end to end."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import dit_gpu
from dit_worker.models.mammoth2_layers import Mammoth2Block, ffn_inner_dim


def test_image_block_flops_match_torch_counter():
    """The analytic GEMM count of a block equals FlopCounterMode's (attention, which the CPU
    counter does not see, is the only part added by hand)."""
    case = dit_gpu.small_cases()[0]
    c = case.config
    ffn = ffn_inner_dim(c.hidden_size, c.multiple_of, c.ffn_dim_multiplier)
    block = Mammoth2Block(c.hidden_size, c.num_attention_heads, c.num_kv_heads, ffn, c.norm_eps, modulation=True)
    seq = 40
    x = torch.randn(1, seq, c.hidden_size)
    rope = (torch.ones(1, seq, c.head_dim // 2), torch.zeros(1, seq, c.head_dim // 2))
    temb = torch.randn(1, min(c.hidden_size, 1024))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(x, rope, None, temb)
    attention = 4 * seq * seq * c.hidden_size
    modulation = 2 * temb.shape[1] * 4 * c.hidden_size
    assert counter.get_total_flops() == dit_gpu.block_flops(case, [seq]) - attention + modulation


def test_small_moe_case_end_to_end(capsys):
    result = dit_gpu.main(["--json", "--only", "6B-A1B", "--repeats", "1", "--layers", "1,2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    (case,) = result["cases"]
    assert result["sizes"] == "small" and case["layers_timed"] == [1, 2]
    t1, per_layer = case["timed_s"]["1"], case["per_layer_ms"] / 1e3
    assert abs(case["step_s"] - (t1 + (case["layers_full"] - 1) * per_layer)) < 1e-3
    # a CFG pair with different prompt lengths: padded, and still a fused kernel
    assert case["attention"]["plans"] == {"native/key_mask_4d": 1}
    assert "math" not in case["attention"]["best_sdpa_kernel_eligible"]
    assert case["moe_layer"]["path"] == "capacity" and case["moe_layer"]["moe_over_dense"] > 0
    assert case["fraction_of_gemm"] > 0 and result["goals"]["moe_layer_over_dense_le_1.3"] in (True, False)
