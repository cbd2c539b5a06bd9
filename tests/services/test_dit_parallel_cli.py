"""``mammoth dit placement --from-metrics``: both metrics formats in, a loadable placement out."""

from __future__ import annotations

import json

import pytest

from dit_worker.parallel.placement import ExpertPlacement, imbalance, rank_loads
from services.cli import main

HOT = [100, 90, 1, 1, 1, 1, 1, 1]  # contiguous placement puts both hot experts on rank 0


def _prometheus(loads) -> str:
    lines = ["# TYPE mammoth_expert_tokens_total counter"]
    for e, v in enumerate(loads):  # two models' samples of one expert add up
        lines.append(f'mammoth_expert_tokens_total{{expert="{e}",model="a"}} {v / 2}')
        lines.append(f'mammoth_expert_tokens_total{{expert="{e}",model="b"}} {v / 2}')
    return "\n".join(lines) + "\n"


def test_placement_from_prometheus_text_balances_ranks(tmp_path, capsys):
    metrics = tmp_path / "metrics.prom"
    metrics.write_text(_prometheus(HOT))
    out = tmp_path / "placement.json"
    assert main(["dit", "placement", "--from-metrics", str(metrics), "--world-size", "2", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    placement = ExpertPlacement.load(out)
    assert summary["rank_imbalance_before"] > 1.9 and summary["rank_imbalance_after"] < 1.1
    assert imbalance(rank_loads(HOT, placement.default)) == pytest.approx(summary["rank_imbalance_after"])


def test_placement_per_layer_from_json_with_replicas(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    layers = {"blocks.0.ffn": HOT, "blocks.1.ffn": HOT[::-1]}
    metrics.write_text(json.dumps({"model": "video", "expert_counts": layers}))
    out = tmp_path / "placement.json"
    assert main(["dit", "placement", "--from-metrics", str(metrics), "--world-size", "2", "--replicas", "2",
                 "-o", str(out)]) == 0
    placement = ExpertPlacement.load(out)
    assert set(placement.layers) == set(layers)
    assert all(len(s) == 5 for s in placement.for_layer("blocks.1.ffn"))
    hottest = {0: 0, 1: 7}  # per layer, the hottest expert gets a copy on both ranks
    for i, (name, loads) in enumerate(layers.items()):
        assert all(hottest[i] in slots for slots in placement.for_layer(name))
        assert imbalance(rank_loads(loads, placement.for_layer(name))) < 1.1


def test_placement_refuses_a_file_without_counts(tmp_path, capsys):
    metrics = tmp_path / "metrics.prom"
    metrics.write_text("some_other_metric 1\n")
    assert main(["dit", "placement", "--from-metrics", str(metrics), "--world-size", "2"]) != 0
    assert "mammoth_expert_tokens_total" in capsys.readouterr().err
