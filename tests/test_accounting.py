"""Parameter counts, KV bytes and FLOPs per token (accounting.py), config reading (config_io.py),
MFU helpers (mfu.py), and `nanoseek params`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nanoseek.accounting import (attention_flops_per_token, count_params, human, kv_cache_bytes_per_token,
                                 training_flops_per_token)
from nanoseek.cli import main
from nanoseek.config import ConfigError, preset
from nanoseek.config_io import load_model_config, model_config_from_toml
from nanoseek.mfu import GPU_PEAKS, measured_peak_flops, mfu, peak_flops, resolve_gpu

V3 = preset("deepseek-v3")
V2L = preset("deepseek-v2-lite")


def _by_hand(D, V, L, dense, H, q_lora, kv_lora, nope, rope, v, inter, moe_inter, E, shared, k, bias):
    """The counts written out independently of accounting.py, for the two published shapes."""
    q = (q_lora * D + q_lora + H * (nope + rope) * q_lora) if q_lora else H * (nope + rope) * D
    attn = q + (kv_lora + rope) * D + kv_lora + H * (nope + v) * kv_lora + D * H * v
    expert = 3 * D * moe_inter
    dense_layer = attn + 3 * D * inter + 2 * D
    moe_shared = attn + E * D + (E if bias else 0) + shared * expert + 2 * D
    total = 2 * V * D + D + dense * dense_layer + (L - dense) * (moe_shared + E * expert)
    active = 2 * V * D + D + dense * dense_layer + (L - dense) * (moe_shared + k * expert)
    mtp = 3 * D + 2 * D * D + moe_shared + E * expert
    return total, active, mtp


def test_deepseek_v3_published_numbers():
    pc = count_params(V3)
    assert round(pc.total_params / 1e9, 1) == 671.0
    assert round(pc.active_params / 1e9, 2) == 37.55
    assert kv_cache_bytes_per_token(V3) == 70_272
    total, active, mtp = _by_hand(7168, 129280, 61, 3, 128, 1536, 512, 128, 64, 128, 18432, 2048, 256, 1, 8, True)
    assert (pc.total_params, pc.active_params, pc.mtp_params) == (total, active, mtp)
    assert pc.total_params == 671_026_419_200 and pc.active_params == 37_552_297_472
    # "11.5B unique" MTP parameters (https://github.com/deepseek-ai/DeepSeek-V3/blob/main/README_WEIGHTS.md)
    # = the MoE decoder block; eh_proj adds 0.10B.
    assert pc.mtp_params == 11_610_068_224
    assert abs(pc.mtp_params - 2 * 7168 * 7168 - 11.5e9) < 0.05e9
    assert pc.mtp_params_with_copies == pc.mtp_params + 2 * 129280 * 7168
    # the router weight [E, D] and the noaux_tc correction bias [E] of all 58 MoE layers
    assert pc.router_params == 58 * (256 * 7168 + 256)
    assert pc.embedding_params == pc.lm_head_params == 129280 * 7168
    assert pc.routed_expert_params == 58 * 256 * 3 * 7168 * 2048


def test_deepseek_v2_lite_counts():
    pc = count_params(V2L)
    total, active, mtp = _by_hand(2048, 102400, 27, 1, 16, None, 512, 128, 64, 128, 10944, 1408, 64, 2, 6, False)
    assert (pc.total_params, pc.active_params) == (total, active)
    assert pc.total_params == 15_706_484_224 and round(pc.total_params / 1e9, 1) == 15.7  # "15.7B" model card
    assert pc.active_params == 2_661_150_208
    assert pc.mtp_params == pc.mtp_params_with_copies == 0
    assert pc.router_params == 26 * 64 * 2048  # greedy routing: no correction bias
    assert kv_cache_bytes_per_token(V2L) == 27 * 576 * 2


def test_active_matmul_and_tied_head():
    pc = count_params(V3)
    biases = 58 * 256
    assert pc.active_matmul_params == pc.active_params - pc.embedding_params - pc.norm_params - biases
    tied = count_params(V3.replace(tie_word_embeddings=True))
    assert tied.total_params == pc.total_params - 129280 * 7168
    assert tied.lm_head_params == 0
    assert tied.active_matmul_params == pc.active_matmul_params  # the head matmul still runs


def test_training_flops_per_token_v3():
    pc = count_params(V3)
    attn = 6 * 61 * 128 * (192 + 128) * 4096 / 2
    assert attention_flops_per_token(V3, 4096) == attn
    assert training_flops_per_token(V3, 4096, include_mtp=False) == 6 * pc.active_matmul_params + attn
    with_mtp = training_flops_per_token(V3, 4096)
    assert with_mtp - training_flops_per_token(V3, 4096, include_mtp=False) == \
        6 * pc.mtp_active_matmul_params + attn / 61
    assert 250e9 < training_flops_per_token(V3, 4096, include_mtp=False) < 251e9
    assert training_flops_per_token(V2L, 4096, include_mtp=True) == training_flops_per_token(V2L, 4096, False)
    with pytest.raises(ValueError):
        training_flops_per_token(V3, 0)


def test_human_units():
    assert human(671_026_419_200) == "671.0B"
    assert human(37_552_297_472) == "37.55B"
    assert human(926_679_040) == "926.7M"
    assert human(2.6064e11, "FLOPs") == "260.6 GFLOPs"


# ----------------------------------------------------------------------------- cross-check with the model
_V2_STYLE = dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                 norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2, first_k_dense_replace=2,
                 tie_word_embeddings=True)


@pytest.mark.parametrize("overrides", [{}, _V2_STYLE], ids=["tiny", "tiny-v2-style-tied"])
def test_counts_match_instantiated_tiny_model(overrides):
    from nanoseek.model import Transformer

    cfg = preset("tiny", **overrides)
    model = Transformer(cfg)
    pc = count_params(cfg)
    # The correction bias is a buffer in the model but a checkpoint tensor here, and only noaux_tc has it.
    def bias(modules):
        return sum(m.mlp.gate.e_score_correction_bias.numel() for m in modules if hasattr(m.mlp, "gate")) \
            if cfg.topk_method == "noaux_tc" else 0

    mtp_ids = {id(p) for p in model.mtp.parameters()}
    main = sum(p.numel() for p in model.parameters() if id(p) not in mtp_ids)  # parameters() dedupes a tied head
    assert main + bias(model.layers) == pc.total_params
    assert sum(p.numel() for p in model.mtp.parameters()) + bias(model.mtp) == pc.mtp_params


# ----------------------------------------------------------------------------- config reading
def test_toml_and_json_configs(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nnum_hidden_layers = 4\n\n[train]\nsteps = 3\n')
    cfg = model_config_from_toml(toml)
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 64
    js = tmp_path / "ckpt"
    js.mkdir()
    (js / "config.json").write_text(json.dumps(V2L.to_hf()))
    assert count_params(load_model_config(js)) == count_params(V2L)
    assert count_params(load_model_config(js / "config.json")) == count_params(V2L)
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npreset = "tiny"\nhiden_size = 3\n')
    with pytest.raises(ConfigError, match="hiden_size"):
        model_config_from_toml(bad)
    bad.write_text('[train]\nsteps = 3\n')
    with pytest.raises(ConfigError, match=r"no \[model\] section"):
        model_config_from_toml(bad)
    bad.write_text('[model\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        model_config_from_toml(bad)


# ----------------------------------------------------------------------------- MFU helpers
def test_gpu_names_and_mfu():
    assert resolve_gpu("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert resolve_gpu("NVIDIA H100 PCIe") == "H100 PCIe"
    assert resolve_gpu("h800") == "H800"
    assert resolve_gpu("NVIDIA H200") == "H200" and resolve_gpu("NVIDIA H20") == "H20"
    assert resolve_gpu("NVIDIA L40S") == "L40S" and resolve_gpu("NVIDIA L4") == "L4"
    assert resolve_gpu("NVIDIA A100-SXM4-80GB") == "A100"
    assert resolve_gpu("rtx-4090") == "RTX 4090"
    with pytest.raises(ValueError, match="unknown GPU"):
        resolve_gpu("L40")
    assert peak_flops("H800") == GPU_PEAKS["H800"] == 989e12
    assert peak_flops("H800", "fp8") == 2 * 989.5e12
    with pytest.raises(ValueError):
        peak_flops("A100", "fp8")
    assert mfu(250e9, 1000.0, 500e12) == pytest.approx(0.5)


def test_measured_peak_is_cached(tmp_path):
    cache = tmp_path / "peak.json"
    first = measured_peak_flops("cpu", torch.float32, size=64, cache_path=cache)
    assert first > 0
    key, = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 123.0}))
    assert measured_peak_flops("cpu", torch.float32, size=64, cache_path=cache) == 123.0
    cache.write_text("{not json")
    assert measured_peak_flops("cpu", torch.float32, size=64, cache_path=cache) > 0


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanoseek"])  # cli.main rewrites sys.argv
    return main


def test_params_cli_json_and_table(cli, capsys):
    assert cli(["params", "--preset", "deepseek-v3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_params"] == 671_026_419_200 and d["kv_cache_bytes_per_token"] == 70_272
    assert d["training_flops_per_token"] > d["training_flops_per_token_no_mtp"]
    assert cli(["params", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    for s in ("671.0B", "37.55B", "11.61B", "70,272 bytes", "GFLOPs"):
        assert s in out


def test_params_cli_config_and_errors(cli, capsys, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text('[model]\npreset = "tiny"\n')
    assert cli(["params", "--config", str(toml), "--json", "--seq-len", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == count_params(preset("tiny")).total_params
    assert cli(["params", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli(["params", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert cli(["params", "--preset", "tiny", "--seq-len", "0"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: neither --preset nor --config
        cli(["params"])
    assert e.value.code == 2
