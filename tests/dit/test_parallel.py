"""Expert / sequence / data parallel DiT over 2 real processes (gloo) vs one process.

One spawn of two ranks per module runs every scenario (process start-up is the expensive
part) and writes what it measured; the tests assert on it. Tolerance: fp32 throughout; a
parallel output may differ from the single-rank one only by summation order (all-to-all
regrouping, row/sequence splits), bounded here by ``ATOL`` on outputs of unit scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dit_worker.engine import DiTEngine, DiTEngineConfig, RequestAborted
from dit_worker.models.moe import MoELayer
from dit_worker.parallel.expert import ExpertParallelMoE
from dit_worker.parallel.placement import ExpertPlacement, PlacementError, balance, imbalance, rank_loads
from dit_worker.parallel.plan import StepPlan, choose_mode, split_rows
from dit_worker.presets import write_random_checkpoint
from dit_worker.requests import SamplingParams, VideoDenoiseRequest
from tests.ports import free_port as _free_port

ATOL = 1e-4  # fp32, outputs of unit scale
WORLD = 2
E, K, D, F_ = 8, 2, 32, 48

# ------------------------------------------------------------------ placement (no processes)


def test_contiguous_placement_and_its_errors():
    p = ExpertPlacement.contiguous(8, 2)
    assert p.default == [[0, 1, 2, 3], [4, 5, 6, 7]] and p.for_layer("blocks.0.ffn") == p.default
    with pytest.raises(PlacementError, match="world_size"):
        ExpertPlacement.contiguous(6, 4)
    with pytest.raises(PlacementError, match="expert 3 is on no rank"):
        ExpertPlacement(4, 2, [[0, 1], [2, 0]])
    with pytest.raises(PlacementError, match="same count"):
        ExpertPlacement(4, 2, [[0, 1, 2], [3]])
    with pytest.raises(PlacementError, match="unknown placement key"):
        ExpertPlacement.from_dict({**p.to_dict(), "extra": 1})


def test_balanced_placement_spreads_hot_experts_and_replicates(tmp_path):
    loads = [100, 90, 1, 1, 1, 1, 1, 1]  # contiguous puts both hot experts on rank 0
    contiguous = ExpertPlacement.contiguous(8, 2).default
    balanced = balance(loads, 2)
    assert imbalance(rank_loads(loads, contiguous)) > 1.9
    assert {0, 1} - set(balanced[0]) and {0, 1} - set(balanced[1])  # one hot expert per rank
    assert imbalance(rank_loads(loads, balanced)) < 1.1
    replicated = balance([400, 1, 1, 1, 1, 1, 1, 1], 2, replicas=2)
    assert all(0 in slots for slots in replicated) and all(len(s) == 5 for s in replicated)
    assert imbalance(rank_loads([400, 1, 1, 1, 1, 1, 1, 1], replicated)) < 1.05
    path = ExpertPlacement.balanced({"blocks.0.ffn": loads, "blocks.1.ffn": loads[::-1]}, 2).save(tmp_path / "p.json")
    loaded = ExpertPlacement.load(path)
    assert loaded.for_layer("blocks.1.ffn") == balance(loads[::-1], 2) and loaded.world_size == 2
    with pytest.raises(PlacementError, match="replicas"):
        balance(loads, 2, replicas=1)


def test_mode_rule_and_row_split():
    assert choose_mode(1, 2) == "sp" and choose_mode(2, 2) == "dp" and choose_mode(6, 2, "sp") == "sp"
    assert split_rows(5, 2) == [(0, 3), (3, 5)] and split_rows(1, 2) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="parallel.mode"):
        choose_mode(2, 2, "tp")


# ------------------------------------------------------------------ spawned ranks


def _reference_layer(shared: bool, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, E, K, F_, num_shared_experts=1 if shared else 0, shared_ffn_hidden_size=40).eval()
    return layer


def _ep_twin(ref: MoELayer, slots: list[list[int]], rank: int) -> ExpertParallelMoE:
    twin = ExpertParallelMoE(D, E, K, F_, slots=slots, rank=rank,
                             num_shared_experts=1 if ref.shared_experts is not None else 0,
                             shared_ffn_hidden_size=40).eval()
    state = ref.state_dict()
    mine = slots[rank]
    state["experts.weight1"] = torch.cat([ref.experts.w1[e].reshape(-1) for e in mine]).view(D, -1)
    state["experts.weight2"] = torch.cat([ref.experts.w2[e] for e in mine], dim=0)
    twin.load_state_dict(state)
    return twin


# (name, shared expert, batch, tokens per rank, slots, skewed bias)
LAYER_CASES = [
    ("skewed_zero_token_experts_b1", False, 1, (7, 3), [[0, 1, 2, 3], [4, 5, 6, 7]], True),
    ("uneven_ranks_b3", False, 3, (5, 1), [[0, 1, 2, 3], [4, 5, 6, 7]], False),
    ("rank_without_tokens", False, 1, (6, 0), [[0, 1, 2, 3], [4, 5, 6, 7]], True),
    ("shared_expert_b3", True, 3, (4, 4), [[0, 1, 2, 3], [4, 5, 6, 7]], False),
    ("moved_and_replicated", True, 1, (9, 2), [[7, 0, 5, 2, 1], [3, 6, 4, 1, 0]], True),
]


def _layer_cases(rank: int) -> dict[str, float]:
    diffs: dict[str, float] = {}
    for i, (name, shared, batch, per_rank, slots, skewed) in enumerate(LAYER_CASES):
        ref = _reference_layer(shared, seed=i)
        if skewed:  # only experts 0, 1, 5 are ever chosen: the others get zero tokens
            ref.router.expert_bias.fill_(-10.0)
            ref.router.expert_bias[[0, 1, 5]] = 10.0
        twin = _ep_twin(ref, slots, rank)
        x = torch.randn(batch, sum(per_rank), D, generator=torch.Generator().manual_seed(100 + i))
        start = sum(per_rank[:rank])
        local = x[:, start:start + per_rank[rank]]
        with torch.inference_mode():
            expected = ref(x)[:, start:start + per_rank[rank]]
            got = twin(local)
        diffs[name] = float((got - expected).abs().max()) if got.numel() else 0.0
        if skewed:
            counts = ref.last_expert_counts.tolist()
            diffs[name + ":zero_experts"] = float(sum(1 for c in counts if c == 0))
    return diffs


def _video_requests(dim: int) -> list[VideoDenoiseRequest]:
    """Deterministic requests: long no-CFG, long CFG, three CFG requests, one 3-way edit."""
    g = torch.Generator().manual_seed(7)

    def prompt(n: int) -> torch.Tensor:
        return torch.randn(n, dim, generator=g)

    def req(rid, frames, h, w, guidance=1.0, source=None, context=1.0, seed=0, steps=3):
        return VideoDenoiseRequest(request_id=rid, prompt=prompt(9), negative=prompt(5), latent_frames=frames,
                                   latent_height=h, latent_width=w, guidance=guidance, source_latents=source,
                                   context_guidance=context, sampling=SamplingParams(steps=steps, seed=seed))

    source = torch.randn(16, 3, 8, 8, generator=g)
    return [
        req("long", 5, 12, 12, seed=1),
        req("long-cfg", 5, 12, 12, guidance=4.0, seed=2),
        *[req(f"batch-{i}", 3, 8, 8, guidance=3.0, seed=10 + i) for i in range(3)],
        req("edit", 3, 8, 8, guidance=3.0, source=source, context=2.0, seed=20),
    ]


def _groups(requests):
    """(name, requests run together, forced mode)."""
    return [("long_sp", requests[:1], "auto"), ("long_cfg_sp", requests[1:2], "sp"),
            ("batch3_dp", requests[2:5], "auto"), ("edit_dp", requests[5:], "auto"),
            ("batch3_sp", requests[2:5], "sp")]


def _rank_main(rank: int, ckpt: str, out: str, ports: list[int]) -> None:
    torch.set_num_threads(1)
    from diffusers.models import attention_dispatch

    from dit_worker.parallel.group import GroupSpec
    from dit_worker.parallel.proxy import parallel_engine
    from dit_worker.parallel.worker import RankWorker

    calls = {"n": 0}
    original = attention_dispatch._all_to_all_single

    def counted(x, group):  # diffusers' Ulysses exchange: proves SP runs through diffusers' code
        calls["n"] += 1
        return original(x, group)

    attention_dispatch._all_to_all_single = counted
    result: dict = {"layers": {}, "ulysses_calls": {}}
    out_dir = Path(out)
    # phase 0: the bare layer, gloo group over the default world
    worker = RankWorker(ckpt, GroupSpec(rank, WORLD, f"tcp://127.0.0.1:{ports[0]}", timeout_s=60))
    result["layers"] = _layer_cases(rank)
    result["bytes_contiguous"] = worker.stats()["parameter_bytes"]
    placements = [None, str(out_dir / "moved.json")]
    for phase, placement in enumerate(placements):
        if phase:
            worker.close()
            worker = RankWorker(ckpt, GroupSpec(rank, WORLD, f"tcp://127.0.0.1:{ports[phase]}", timeout_s=60),
                                placement=placement)
            result["bytes_moved"] = worker.stats()["parameter_bytes"]
        if rank:
            worker.follow()
            continue
        dim = worker.model.config.refiner.vlm_dim
        outputs = {}
        for name, group, mode in _groups(_video_requests(dim)):
            engine = parallel_engine(Path(ckpt), DiTEngineConfig(), worker, world_size=WORLD, mode=mode)
            before = calls["n"]
            done = engine.generate(group)
            result["ulysses_calls"][f"{phase}:{name}"] = calls["n"] - before
            for r in done:
                outputs[f"{phase}:{name}:{r.request_id}"] = r.latents
            result.setdefault("counts", {})[f"{phase}:{name}"] = engine.expert_load()
        stats = worker.stats()
        result.setdefault("rank_tokens", []).append(stats["rank_tokens"])
        torch.save(outputs, out_dir / f"outputs{phase}.pt")
        worker.submit(StepPlan("stop"))
    worker.close()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    ckpt = write_random_checkpoint("tiny-mammoth25", root / "dit", seed=0)
    # phase 1 moves every expert to the other rank and replicates two of them
    ExpertPlacement(8, 2, [[7, 6, 5, 4, 0], [3, 2, 1, 0, 6]]).save(root / "moved.json")
    mp.start_processes(_rank_main, args=(str(ckpt), str(root), [_free_port(), _free_port()]), nprocs=WORLD,
                       start_method="spawn", join=True)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    outputs = {**torch.load(root / "outputs0.pt"), **torch.load(root / "outputs1.pt")}
    return {"root": root, "ckpt": ckpt, "ranks": ranks, "outputs": outputs}


@pytest.fixture(scope="module")
def single(spawned):
    engine = DiTEngine.from_pretrained(spawned["ckpt"], DiTEngineConfig())
    requests = _video_requests(engine.model.config.refiner.vlm_dim)
    outputs, counts = {}, {}
    for name, group, _ in _groups(requests):
        for r in engine.generate(group):
            assert not isinstance(r, RequestAborted)
            outputs[f"{name}:{r.request_id}"] = r.latents
        counts[name] = engine.expert_load()
    return {"engine": engine, "outputs": outputs, "counts": counts}


@pytest.mark.parametrize("case", [c[0] for c in LAYER_CASES])
def test_expert_parallel_layer_equals_single_rank(spawned, case):
    for rank in spawned["ranks"]:
        assert rank["layers"][case] <= ATOL, (case, rank["layers"][case])
        if case + ":zero_experts" in rank["layers"]:
            assert rank["layers"][case + ":zero_experts"] >= 4  # the skew really left experts idle


@pytest.mark.parametrize("phase", [0, 1], ids=["contiguous", "moved_placement"])
@pytest.mark.parametrize("group", ["long_sp", "long_cfg_sp", "batch3_dp", "edit_dp", "batch3_sp"])
def test_parallel_engine_equals_single_rank(spawned, single, phase, group):
    keys = [k for k in single["outputs"] if k.startswith(group + ":")]
    assert keys
    for key in keys:
        got, want = spawned["outputs"][f"{phase}:{key}"], single["outputs"][key]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= ATOL, key
        assert float(want.abs().max()) > 0.1  # not a trivially small output


def test_sequence_parallel_runs_diffusers_ulysses_and_data_parallel_does_not(spawned):
    calls = spawned["ranks"][0]["ulysses_calls"]
    layers, steps = 2, 3  # tiny preset: 2 blocks; every request runs 3 steps
    for phase in (0, 1):
        # q, k, v in and the output back: 4 exchanges per attention call
        assert calls[f"{phase}:long_sp"] == 4 * layers * steps
        assert calls[f"{phase}:long_cfg_sp"] == 4 * layers * steps
        assert calls[f"{phase}:batch3_sp"] == 4 * layers * steps
        assert calls[f"{phase}:batch3_dp"] == 0 and calls[f"{phase}:edit_dp"] == 0


def test_expert_counts_summed_over_ranks_match_single_rank(spawned, single):
    counts = spawned["ranks"][0]["counts"]
    for group, want in single["counts"].items():
        assert counts[f"0:{group}"] == want, group  # same routing, counted on the owning ranks
    assert sum(spawned["ranks"][0]["rank_tokens"][0]) > 0


def test_each_rank_holds_only_its_experts(spawned, single):
    model = single["engine"].model
    expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(
        ("ffn.experts.weight1", "ffn.experts.weight2")))
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for rank in spawned["ranks"]:
        held = rank["bytes_contiguous"]
        assert held["expert"] == expert // WORLD
        assert held["dense"] == total - expert
        assert rank["bytes_moved"]["expert"] == expert * 5 // 8  # 5 of the 8 experts per rank (2 replicated)
