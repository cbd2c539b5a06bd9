"""bench.throughput: argument parsing, the JSON plan, and tiny real runs of its in-process parts
(the served and start-up parts start Ray Serve; they run only in the benchmark itself)."""

from __future__ import annotations

import json

import pytest

from bench import throughput
from dit_worker.models.transformer_mammoth2 import Mammoth2DiTConfig


def test_dry_run_prints_the_plan_as_the_last_json_line(capsys):
    plan = throughput.main(["--dry-run", "--json", "--parts", "mixed,cache", "--concurrency", "1,4",
                            "--cache-thresholds", "0.1,0.3"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == plan and plan["bench"] == "throughput" and plan["dry_run"]
    assert plan["parts"] == ["mixed", "cache"] and plan["concurrency"] == [1, 4]
    assert plan["cache_thresholds"] == [0.1, 0.3] and "cpu_capability" in plan


def test_unknown_parts_are_refused():
    with pytest.raises(SystemExit, match="unknown"):
        throughput.main(["--parts", "served,nope"])


def test_cache_sweep_reports_fractions_errors_and_a_tuned_threshold():
    out = throughput.cache_sweep("tiny", Mammoth2DiTConfig.tiny(), [1e-6, 10.0], steps=6, latent=8, count=2,
                                 warmup=0.0, max_cached=100)
    tight, loose = out["sweep"]
    assert tight["fraction_computed"] == 1.0 and tight["rel_l2_max"] == 0.0
    assert loose["fraction_computed"] == pytest.approx(1 / 6, abs=1e-3) and loose["rel_l2_max"] > 0
    assert out["tuned"]["threshold"] in (1e-6, 10.0) and isinstance(out["meets_target"], bool)


def test_mixed_part_runs_every_variant_through_the_stage():
    out = throughput.mixed(steps=2, pairs=1)
    for name in ("mixed_default", "mixed_one_padded_forward", "one_shape_per_batch"):
        assert out[name]["forwards"] >= 2 and out[name]["wall_s"] > 0
    assert out["mixed_one_padded_forward"]["forwards"] == 2  # both sizes in one forward per step
    assert out["mixed_default"]["forwards"] == 4  # 32 vs 64 latents: one forward per size per step
    assert "ratio_small_p50_vs_one_shape" in out["mixed_default"]
