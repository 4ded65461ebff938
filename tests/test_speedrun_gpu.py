"""The GPU speedrun (`nanoseek speedrun --preset gpu`, configs/speedrun-gpu.toml), seen from a CPU: its plan
loads and every stage's settings are valid, its model is DeepSeek-V3-shaped with a few hundred million
parameters, it refuses to start without CUDA unless --device cpu is given, and its stage wiring runs end to
end on the CPU when shrunk by --quick. The real run (real model, bf16 on CUDA, a few steps per stage) is
the gpu-marked test at the end (`make test-gpu`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.accounting import count_params
from nanoseek.device import autocast_dtype
from nanoseek.model import Transformer
from nanoseek.speedrun import PRESETS, load_plan

ROOT = Path(__file__).resolve().parents[1]
GPU_TOML = ROOT / "configs" / "speedrun-gpu.toml"


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def plan():
    return load_plan(PRESETS["gpu"], [])


def test_the_preset_is_the_gpu_config_and_every_stage_is_valid(plan):
    assert PRESETS["gpu"] == GPU_TOML and plan.source == str(GPU_TOML)
    t = plan.run.train
    assert t.device == "cuda" and t.dtype == "auto" and autocast_dtype(t.dtype, torch.device("cuda")) == torch.bfloat16
    assert t.steps > 0 and t.batch_size > 0 and t.warmup_steps < t.steps
    cfg = plan.run.model_config()
    assert t.seq_len <= cfg.max_position_embeddings
    # The R1 half: SFT, eval and GRPO validated by load_plan; their sequences fit the context.
    assert plan.sft.steps > 0 and plan.grpo.steps > 0 and plan.eval.n > 0 and plan.eval.k > 0
    assert plan.grpo.task == plan.speedrun.task == "countdown"
    assert plan.eval.max_new_tokens < cfg.max_position_embeddings and plan.grpo.max_new_tokens < cfg.max_position_embeddings
    assert plan.run.data.vocab_size <= cfg.vocab_size  # the tokenizer's rows fit the embedding


def test_the_model_is_deepseek_v3_shaped_with_a_few_hundred_million_parameters(plan):
    cfg = plan.run.model_config()
    # MLA (low-rank q and kv, decoupled rope), routed + shared experts with group-limited routing, MTP.
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.qk_rope_head_dim and cfg.qk_nope_head_dim
    assert cfg.n_routed_experts >= 32 and cfg.n_shared_experts >= 1 and 1 < cfg.num_experts_per_tok < cfg.n_routed_experts
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.topk_method == "noaux_tc"
    assert cfg.num_nextn_predict_layers == 1 and sum(cfg.is_moe_layer) == cfg.num_hidden_layers - cfg.first_k_dense_replace
    # The parameters counted from the config's shapes: the model built on `meta` (no memory) ...
    with torch.device("meta"):
        model = Transformer(cfg)
    # (nanoseek.accounting counts the balancing bias as HF does, as a parameter; here it is a buffer)
    bias = sum(m.gate.e_score_correction_bias.numel() for m in model.moe_layers(include_mtp=False))
    total = model.num_params() + bias
    assert 100e6 <= total < 1e9, total  # "a few hundred million"
    assert count_params(cfg).total_params == total
    # ... is what `nanoseek params` prints for the config file.
    r = _cli("params", "--config", str(GPU_TOML), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == total


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = _cli("speedrun", "--preset", "gpu", "--out", str(out), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nanoseek speedrun: ") and "speedrun-gpu.toml" in lines[0]
    assert "CUDA is not available" in lines[0] and "--device cpu" in lines[0]
    assert not out.exists()
    # An explicit GPU device on the CPU speedrun is refused the same way.
    r = _cli("speedrun", "--out", str(out), "--device", "cuda", timeout=120)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and not out.exists()
    r = _cli("speedrun", "--out", str(out), "--preset", "gpu", "--config", str(GPU_TOML), timeout=120)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_the_gpu_stage_wiring_runs_on_the_cpu_when_shrunk(tmp_path, capsys):
    """--preset gpu --quick --device cpu: the GPU plan with --quick's small model dimensions and step counts
    (the GPU config's 64 experts in 8 groups, the shared expert and MTP stay) through all seven stages."""
    from nanoseek.cli import main

    import nanoseek

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["speedrun", "--preset", "gpu", "--quick", "--device", "cpu", "--out", str(out),
                     "--no-progress", "--set", "eval.n=8", "--set", "sft.steps=4"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"{GPU_TOML} on cpu" in err and "pretraining: 6,144 tokens" in err  # --quick: 12 steps x 8 x 64
    rep = json.loads((out / "report.json").read_text())
    assert rep["config_file"] == str(GPU_TOML) and rep["machine"]["device"] == "cpu"
    assert set(rep["stage_seconds"]) >= {"tokenizer", "pretrain", "sft", "eval_before_rl", "grpo", "eval_after_rl",
                                         "export"}
    pre = rep["config"]["pretrain"]
    assert pre["train"]["device"] == "cpu" and pre["model"]["n_routed_experts"] == 64
    model = nanoseek.load(rep["model_dir"])
    assert model.config.n_routed_experts == 64 and model.config.n_shared_experts == 1 and len(model.mtp) == 1
    assert rep["params"] == model.num_params() and rep["evals"]["grpo"]["n"] == 8
    md = (out / "report.md").read_text()
    assert "speedrun-gpu.toml" in md and "on cpu" in md


# ----------------------------------------------------------------------------- on a GPU (make test-gpu)
# The real GPU speedrun, every stage, with step caps: the real model (a few hundred million parameters) in
# bf16 on CUDA. A smaller corpus and a few steps per stage keep it to a couple of minutes; scripts/gpu_check.sh
# leaves it out (see there), `make test-gpu` runs it.
GPU_CAPS = ["data.n_docs=5000", "train.steps=20", "train.warmup_steps=2", "train.log_every=5", "sft.steps=5",
            "sft.n_examples=640", "eval.n=16", "eval.k=2", "eval.base=false", "grpo.steps=2", "grpo.prompts_per_step=4",
            "grpo.G=4"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_speedrun_on_cuda(tmp_path):
    out = tmp_path / "run"
    r = _cli("speedrun", "--preset", "gpu", "--out", str(out), "--no-progress",
             *[a for s in GPU_CAPS for a in ("--set", s)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["machine"]["device"].startswith("cuda") and rep["machine"]["gpu"]
    assert rep["config"]["pretrain"]["train"]["dtype"] == "auto" and 100e6 <= rep["params"] < 1e9
    assert rep["tokens_per_s"] > 0 and rep["mfu"] > 0
    assert rep["machine"]["gpu"] in (out / "report.md").read_text()
    print(f"{rep['machine']['gpu']}: {rep['tokens_per_s']:.0f} tok/s, MFU {rep['mfu']:.1%}; stages {rep['stage_seconds']}")


def test_the_benchmarks_fast_dtype_is_what_train_dtype_auto_picks(monkeypatch):
    """benchmarks.common.fast_dtype follows the CPU's flags as `train.dtype = "auto"` does (a timing, used
    before, flipped between runs on one machine), and is bf16 on CUDA."""
    import nanoseek.device
    from benchmarks.common import fast_dtype

    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(nanoseek.device, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert fast_dtype("cpu") == want
        assert (autocast_dtype("auto", torch.device("cpu")) or torch.float32) == want
    assert fast_dtype("cuda") == torch.bfloat16
