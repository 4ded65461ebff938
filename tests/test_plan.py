"""`nanoseek plan`: the DeepSeek-V3 layout reproduction, the memory model's monotonic sanity, the accounting
behind it, the search, and the CLI's JSON and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from nanoseek.accounting import count_params, training_flops_per_token
from nanoseek.cli import main
from nanoseek.config import preset
from nanoseek.cost import implied_mfu
from nanoseek.mfu import peak_flops
from nanoseek.plan import Assumptions, Layout, PlanError, estimate, make_cluster, search, v3_mfu
from nanoseek.plan.blocks import pieces, split_layers, stage_rank
from nanoseek.plan.specs import PRECISIONS

V3 = preset("deepseek-v3")
V3_LAYOUT = Layout(pp=16, ep=64, schedule="DualPipeV", zero=1)


@pytest.fixture(scope="module")
def h800():
    return make_cluster("H800", 2048, 8)


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nanoseek"])

    def call(*args):
        rc = main(["plan", *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return call


def test_v3_layout_fits_and_reproduces_the_reported_cost(h800):
    # The default MFU is the one `nanoseek cost` derives from V3's published 2,664K GPU-hours for 14.8T tokens.
    assert h800.mfu == pytest.approx(implied_mfu(training_flops_per_token(V3, 4096), 14.8e12, peak_flops("H800"), 2.664e6))
    assert 0.39 < h800.mfu < 0.42
    p = estimate(V3, h800, V3_LAYOUT)
    lay = p["layout"]
    assert (lay["dp"], lay["stages"], lay["micro_batches"], lay["ep_nodes"], lay["node_fanout"]) == (2, 32, 120, 8, 4)
    assert sum(lay["stage_layers"]) == 61
    assert p["fits"] and p["memory_gib_per_gpu"] < 80
    hours = p["gpu_hours_per_trillion_tokens"]
    assert abs(hours / 180e3 - 1) < 0.15, hours
    # It lands above the report by what it adds on top of compute at that MFU, and nothing else.
    t = p["time"]
    assert hours > 180e3 and t["bubble_s"] > 0 and t["ep_exposed_s"] == 0 and t["ep_all_to_all_s"] > 0
    step = t["compute_s"] + t["bubble_s"] + t["ep_exposed_s"] + t["pp_p2p_exposed_s"] + t["dp_exposed_s"]
    assert p["step_time_s"] == pytest.approx(step)
    # V-shaped: rank 0 holds the embedding, the head and the MTP module (no embedding copy).
    assert "embedding" in p["ranks"][0]["holds"] and "MTP 0" in p["ranks"][0]["holds"]
    assert "copy" not in " ".join(r["holds"] for r in p["ranks"])
    # Counting the stage imbalance (61 layers + head + MTP over 16 ranks) costs more, never less.
    strict = estimate(V3, h800, V3_LAYOUT, Assumptions(count_stage_imbalance=True))
    assert strict["time"]["stage_imbalance"] > 1
    assert strict["gpu_hours_per_trillion_tokens"] > hours


def test_pieces_add_up_to_the_accounting():
    for name in ("deepseek-v3", "tiny", "deepseek-v2-lite"):
        cfg = preset(name)
        layers, emb, head, mtp = pieces(cfg, 4096, PRECISIONS["v3"])
        parts = [*layers, emb, head, *mtp]
        pc = count_params(cfg)
        total = sum(p.dense_params + p.expert_params for p in parts)
        assert total == pc.total_params + pc.mtp_params
        assert 3 * sum(p.fwd_flops for p in parts) == pytest.approx(training_flops_per_token(cfg, 4096))


def test_rank_memory_adds_up(h800):
    p = estimate(V3, h800, V3_LAYOUT)
    m = p["memory"]
    allocated = (m["weights_gib"] + m["gradients_gib"] + m["optimizer_gib"] + m["activations_gib"] + m["logits_gib"]
                 + m["moe_dispatch_buffers_gib"] + m["recompute_workspace_gib"] + m["zero3_gathered_weights_gib"])
    assert allocated * 0.05 == pytest.approx(m["fragmentation_gib"])
    assert p["memory_gib_per_gpu"] == pytest.approx(allocated + m["fragmentation_gib"] + m["runtime_reserve_gib"])
    assert m["activations_gib"] == pytest.approx(16.5 * m["activations_per_micro_batch_gib"])  # DualPipeV: pp + 1/2
    # Every routed expert once per EP group: the ranks' parameters x ep x dp-independent = the model.
    pc = count_params(V3)
    experts = pc.routed_expert_params + V3.n_routed_experts * 3 * V3.hidden_size * V3.moe_intermediate_size
    dense = pc.total_params + pc.mtp_params - experts
    assert sum(r["params"] for r in p["ranks"]) == pytest.approx(dense + experts / 64)


def test_more_pipeline_stages_hold_fewer_weights(h800):
    prev = float("inf")
    for pp in (2, 4, 8, 16):
        p = estimate(V3, h800, dataclasses.replace(V3_LAYOUT, pp=pp))
        weights = max(r["memory"]["weights_gib"] for r in p["ranks"])
        assert weights < prev
        prev = weights


def test_recompute_and_micro_batch_move_activation_memory(h800):
    act = {}
    plain = estimate(V3, h800, dataclasses.replace(V3_LAYOUT, recompute="none"))["time"]["compute_s"]
    for mode in ("none", "selective", "full"):
        p = estimate(V3, h800, dataclasses.replace(V3_LAYOUT, recompute=mode))
        act[mode] = p["memory"]["activations_per_micro_batch_gib"]
        if mode == "full":
            assert p["memory"]["recompute_workspace_gib"] > 0
        if mode != "none":  # recomputation costs compute
            assert p["time"]["compute_s"] > plain
    assert act["none"] > act["selective"] > act["full"] > 0
    one = estimate(V3, h800, V3_LAYOUT)["memory"]
    two = estimate(V3, h800, dataclasses.replace(V3_LAYOUT, micro_batch=2))["memory"]
    assert two["activations_gib"] > one["activations_gib"]
    assert two["activations_per_micro_batch_gib"] == pytest.approx(2 * one["activations_per_micro_batch_gib"])


def test_zero_stages_and_schedules(h800):
    mem = [estimate(V3, h800, dataclasses.replace(V3_LAYOUT, zero=z))["memory"] for z in (1, 2, 3)]
    static = [m["weights_gib"] + m["gradients_gib"] + m["optimizer_gib"] for m in mem]
    assert static[0] > static[1] > static[2]
    assert mem[0]["weights_gib"] == mem[1]["weights_gib"] > mem[2]["weights_gib"]
    one = estimate(V3, h800, dataclasses.replace(V3_LAYOUT, schedule="1F1B"))
    flights = [r["memory"]["in_flight_micro_batches"] for r in one["ranks"]]
    assert flights == [16 - r for r in range(16)]  # 1F1B: pp - r on rank r
    assert "copy" in one["ranks"][15]["holds"]  # MTP on the last rank needs its own embedding there
    bubbles = {s: estimate(V3, h800, dataclasses.replace(V3_LAYOUT, schedule=s))["time"]["bubble_s"]
               for s in ("1F1B", "ZBVZeroBubble", "DualPipeV")}
    assert bubbles["1F1B"] > bubbles["DualPipeV"] > bubbles["ZBVZeroBubble"] >= 0
    inter = estimate(V3, make_cluster("H800", 1024, 8), Layout(pp=8, ep=64, schedule="Interleaved1F1B",
                                                              global_batch=128 * 64))
    assert inter["time"]["bubble_s"] > 0 and inter["layout"]["stages"] == 16


def test_split_layers_balances_the_busiest_rank():
    # 8 equal layers, 4 stages, the head (cost 2) on the last: it gets fewer layers.
    counts = split_layers([1.0] * 8, [0, 0, 0, 2.0], [0, 1, 2, 3], 4)
    loads = [counts[i] + (2.0 if i == 3 else 0) for i in range(4)]
    assert sum(counts) == 8 and max(loads) == 3
    # V-shape: stage s and 2pp-1-s share a rank; every stage without embedding/head keeps a layer.
    ranks = [stage_rank(s, 4, "DualPipeV") for s in range(8)]
    assert ranks == [0, 1, 2, 3, 3, 2, 1, 0]
    counts = split_layers([1.0] * 10, [0.5, 0, 0, 0, 0, 0, 0, 3.0], ranks, 4)
    assert sum(counts) == 10 and min(counts[1:-1]) >= 1
    with pytest.raises(PlanError, match="decoder layers"):
        split_layers([1.0] * 3, [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5], 6)


def test_search_ranks_only_layouts_that_fit():
    cfg = preset("deepseek-v2-lite")
    cl = make_cluster("A100", 32, 8, mfu=0.4)
    base = Layout(pp=1, ep=1, global_batch=512, seq_len=4096)
    out = search(cfg, cl, base, top=5, zero=1)
    assert out["results"] and out["fitting"] < out["evaluated"] - out["invalid"]  # some do not fit
    hours = [r["gpu_hours_per_trillion_tokens"] for r in out["results"]]
    assert hours == sorted(hours) and all(r["fits"] for r in out["results"])
    assert all(r["layout"]["zero"] == 1 for r in out["results"])  # a fixed choice stays fixed
    best = out["results"][0]["layout"]
    again = estimate(cfg, cl, Layout(pp=best["pp"], ep=best["ep"], schedule=None if best["schedule"] == "none"
                                     else best["schedule"], recompute=best["recompute"], zero=1,
                                     global_batch=512, seq_len=4096))
    assert again["gpu_hours_per_trillion_tokens"] == pytest.approx(hours[0])
    tight = search(cfg, make_cluster("A100", 32, 8, mfu=0.4, memory_gib=8), base, zero=1)
    assert tight["fitting"] < out["fitting"]


def test_cli_json_and_table(cli):
    args = ["--preset", "deepseek-v3", "--gpu", "H800", "--gpus", "2048", "--gpus-per-node", "8", "--pp", "16",
            "--ep", "64", "--schedule", "DualPipeV", "--zero", "1"]
    rc, out, err = cli(*args, "--json")
    assert rc == 0, err
    p = json.loads(out)
    for key in ("fits", "memory_gib_per_gpu", "gpu_hours_per_trillion_tokens", "memory", "time", "layout", "ranks",
                "assumptions", "precision", "cluster"):
        assert key in p
    assert p["fits"] is True and p["model"] == "deepseek-v3"
    rc, out, _ = cli(*args)
    assert rc == 0 and "fits" in out and "GPU-hours per 1T tokens" in out
    rc, out, _ = cli(*args, "--json", "--set", "runtime_reserve_gib=30", "--set", "act_bytes=4")
    assert json.loads(out)["memory_gib_per_gpu"] > p["memory_gib_per_gpu"] + 28
    rc, out, _ = cli("--preset", "deepseek-v2-lite", "--gpu", "A100", "--gpus", "32", "--gpus-per-node", "8",
                     "--global-batch", "512", "--search", "--zero", "1", "--recompute", "selective", "--top", "3")
    assert rc == 0 and "fit; the 3 cheapest" in out


@pytest.mark.parametrize("extra,needle", [
    (["--pp", "16", "--ep", "48"], "must divide n_routed_experts"),
    (["--pp", "16", "--ep", "64", "--dp", "4"], "!= --gpus"),
    (["--pp", "7", "--ep", "64"], "must divide --gpus"),
    (["--pp", "64", "--ep", "32"], "decoder layers"),
    (["--pp", "16", "--ep", "64", "--schedule", "DualPipeV", "--global-batch", "3072"], "at least 2 x pp"),
    (["--pp", "16", "--ep", "64", "--tp", "2"], "tensor parallelism"),
    (["--pp", "16", "--ep", "64", "--micro-batch", "7"], "not a multiple"),
    (["--pp", "1", "--ep", "64", "--schedule", "1F1B"], "needs --pp > 1"),
    (["--pp", "16", "--ep", "64", "--stage-layers", "4,4"], "--stage-layers needs 16"),
    (["--pp", "16", "--ep", "64", "--set", "warp_factor=9"], "unknown name"),
    (["--pp", "16", "--ep", "64", "--mfu", "1.5"], "--mfu"),
    (["--ep", "64"], "--pp and --ep are required"),
    (["--pp", "16", "--ep", "64", "--gpus-per-node", "6"], "whole nodes"),
])
def test_cli_errors_are_one_line(cli, extra, needle):
    # (an option given twice: argparse keeps the last, so `extra` may override the cluster)
    rc, out, err = cli("--preset", "deepseek-v3", "--gpu", "H800", "--gpus", "2048", "--gpus-per-node", "8", *extra)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoseek plan: ") and needle in lines[0], err


def test_unknown_gpu_and_model(cli):
    rc, _, err = cli("--preset", "deepseek-v3", "--gpu", "Z9000", "--gpus", "8", "--gpus-per-node", "8",
                     "--pp", "1", "--ep", "8")
    assert rc == 2 and "unknown GPU" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli("--preset", "nope", "--gpu", "H100", "--gpus", "8", "--gpus-per-node", "8", "--pp", "1", "--ep", "1")
    assert rc == 2 and "unknown preset" in err


def test_v3_mfu_is_the_cost_commands(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanoseek"])
    main(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--gpu", "H800", "--gpu-hours", "2.664M", "--json"])
    assert json.loads(capsys.readouterr().out)["implied_mfu"] == pytest.approx(v3_mfu())
