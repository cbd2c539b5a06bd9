"""`mammoth presets` and `mammoth init-tiny`: meta-device counts and deterministic model dirs."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.cli import main
from services.model_dir import ModelDirError, read_index


def test_presets_json_counts_land_near_the_preset_names(capsys):
    assert main(["presets", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) == {"tiny-mammoth2", "tiny-mammoth25", "mammoth2-dev", "mammoth25-6b-a1b", "mammoth25-20b-a3b",
                           "tiny-mammoth2-preview", "mammoth2-preview"}
    for name, entry in report.items():
        assert {"planner", "dit", "vae"} <= set(entry["stages"]), name
        assert entry["total"] == sum(s["total"] for s in entry["stages"].values())
        for counts in entry["stages"].values():
            assert 0 < counts["active"] <= counts["total"]
    for name, total, active in (("mammoth25-6b-a1b", 6e9, 1.2e9), ("mammoth25-20b-a3b", 20e9, 3e9)):
        dit = report[name]["stages"]["dit"]
        assert abs(dit["total"] / total - 1) < 0.15 and abs(dit["active"] / active - 1) < 0.15, (name, dit)
    dev = report["mammoth2-dev"]["stages"]
    assert 7e9 < dev["planner"]["total"] and dev["planner"]["active"] < dev["planner"]["total"]  # gen experts idle
    assert report["tiny-mammoth2"]["total"] < 1e8


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("preset", ["tiny-mammoth2", "tiny-mammoth25", "tiny-mammoth2-preview"])
def test_init_tiny_writes_a_complete_deterministic_model_dir(tmp_path, capsys, preset):
    assert main(["init-tiny", str(tmp_path / "a"), "--preset", preset, "--seed", "3"]) == 0
    assert main(["init-tiny", str(tmp_path / "b"), "--preset", preset, "--seed", "3"]) == 0
    assert main(["init-tiny", str(tmp_path / "c"), "--preset", preset, "--seed", "4"]) == 0
    index = read_index(tmp_path / "a")
    assert index.preset == preset and set(index.stages) == {"planner", "dit", "vae"}
    for stage in index.stages.values():
        assert (tmp_path / "a" / stage / "config.json").is_file()
        assert list((tmp_path / "a" / stage).glob("*.safetensors"))
    assert (tmp_path / "a" / "planner" / "tokenizer.json").is_file()
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b, "same seed, same bytes"
    assert a.keys() == c.keys() and a["dit/diffusion_pytorch_model.safetensors"] != c["dit/diffusion_pytorch_model.safetensors"]
    # refusing to overwrite is the default
    assert main(["init-tiny", str(tmp_path / "a"), "--preset", preset]) == 2
    assert "not empty" in capsys.readouterr().err


def test_init_tiny_refuses_real_presets(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["init-tiny", str(tmp_path), "--preset", "mammoth2-dev"])
    assert info.value.code == 2


def test_read_index_names_what_is_missing(tmp_path):
    with pytest.raises(ModelDirError, match="no model_index.json"):
        read_index(tmp_path)
    (tmp_path / "model_index.json").write_text('{"family": "mammoth2", "preset": "x", "tasks": [], '
                                               '"stages": {"dit": "dit"}}')
    with pytest.raises(ModelDirError, match="dit/config.json"):
        read_index(tmp_path)
