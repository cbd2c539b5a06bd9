"""Every benchmark's defaults respect the CPU: dtypes without native matmuls are skipped with a
note, and the JSON records ``cpu_capability``. Plans come from ``--dry-run`` (no benchmark is run
at its defaults here); two tiny real runs check that the plan is what actually runs."""

from __future__ import annotations

import json

import pytest

from bench import dit_step, moe_layer, planner, serve_overhead, vae
from mammoth_common import cpu

AVX2, AVX512_BF16 = "AVX2", "AVX512+avx512_bf16"
SKIP_AVX2 = {"bfloat16": "no native bf16 on AVX2"}


@pytest.fixture
def as_cpu(monkeypatch):
    for name in cpu.ONEDNN_ENVS:
        monkeypatch.delenv(name, raising=False)
    return lambda value: monkeypatch.setenv(cpu.OVERRIDE_ENV, value)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("bench", [dit_step, moe_layer], ids=["dit_step", "moe_layer"])
def test_low_precision_benches_skip_what_the_cpu_lacks(bench, as_cpu, capsys):
    as_cpu(AVX2)
    plan = bench.main(["--dry-run", "--json"])
    assert plan["dtypes"] == ["float32"] and plan["skipped"] == SKIP_AVX2 and plan["cpu_capability"] == "AVX2"
    assert _last_json(capsys)["skipped"] == SKIP_AVX2
    as_cpu(AVX512_BF16)
    plan = bench.main(["--dry-run", "--json"])
    assert sorted(plan["dtypes"]) == ["bfloat16", "float32"] and plan["skipped"] == {}
    assert plan["cpu_capability"] == "AVX512" and plan["cpu"]["native_dtypes"] == ["float32", "bfloat16"]


@pytest.mark.parametrize("bench", [dit_step, moe_layer], ids=["dit_step", "moe_layer"])
def test_only_slow_dtypes_asked_for_is_an_error_unless_allowed(bench, as_cpu, capsys):
    as_cpu(AVX2)
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--dtypes", "bfloat16"])
    assert "--dtypes: nothing left to run" in capsys.readouterr().err
    assert bench.main(["--dry-run", "--dtypes", "bfloat16", "--allow-slow"])["dtypes"] == ["bfloat16"]


@pytest.mark.parametrize("value", [AVX2, AVX512_BF16])
def test_float32_benches_record_the_cpu(value, as_cpu, capsys):
    as_cpu(value)
    isa = value.split("+")[0]
    assert vae.main(["--dry-run"]) == 0
    plan = _last_json(capsys)
    assert plan["dtypes"] == ["float32"] and plan["cpu_capability"] == isa
    plan = planner.main(["--dry-run"])
    assert plan["dtypes"] == ["float32"] and plan["cpu_capability"] == isa
    plan = serve_overhead.main(["--dry-run"])
    assert plan["stage_dtypes"] == {"planner": "float32", "dit": "float32", "vae": "float32"}
    assert plan["cpu_capability"] == isa


def test_moe_run_follows_the_plan_and_bounds_the_reference(as_cpu, capsys):
    as_cpu(AVX2)
    out = moe_layer.main(["--json", "--width", "64", "--experts", "4", "--top-k", "2", "--ffn", "32",
                          "--tokens", "64", "--reps", "7", "--extra-reps", "50", "--budget-s", "0",
                          "--balance-steps", "0"])
    assert [r["dtype"] for r in out["results"]] == ["float32"] and out["skipped"] == SKIP_AVX2
    assert out["results"][0]["reps"] == {"grouped_dense": 1, "others": 1}  # the budget caps every group
    assert out["cpu_capability"] == "AVX2" and set(out["cpu"]["matmul_time_vs_float32"]) == {"bfloat16", "float16"}
    assert _last_json(capsys)["dtype"] == "float32"


def test_dit_step_run_follows_the_plan(as_cpu, capsys):
    as_cpu(AVX2)
    out = dit_step.main(["--json", "--layers", "1", "--image-px", "64", "--repeats", "9", "--budget-s", "0"])
    assert [r["dtype"] for r in out["runs"]] == ["float32"] and out["skipped"] == SKIP_AVX2
    assert out["runs"][0]["step_repeats"] == 1  # the budget caps the timed steps
    assert out["dtype"] == "float32" and out["cpu_capability"] == "AVX2"
