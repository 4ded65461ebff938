"""The quick speedrun end to end: report.json with its keys, plots, and an exported model that loads;
plus the sft / eval / grpo / distill command lines on its outputs. The full speedrun on the default plan,
with its headline numbers as a regression test, is in the slow suite (`make test-slow`)."""

import json
import subprocess
import sys

import pytest

import nanoseek
from conftest import require_module


@pytest.fixture(scope="module")
def run_dir(speedrun_quick):
    return speedrun_quick  # the session's one quick speedrun (conftest), shared with the README test


def test_report_has_the_keys(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    for key in ("accuracy_before_rl", "accuracy_after_rl", "model_dir", "stage_seconds", "tokens_per_s", "mfu",
                "cost_projection", "total_seconds", "evals", "grpo_history"):
        assert key in rep, key
    assert 0.0 <= rep["accuracy_before_rl"] <= 1.0 and 0.0 <= rep["accuracy_after_rl"] <= 1.0
    assert set(rep["stage_seconds"]) >= {"tokenizer", "pretrain", "sft", "eval_before_rl", "grpo", "eval_after_rl", "export"}
    assert rep["tokens_per_s"] > 0 and rep["mfu"] > 0 and rep["cost_projection"]["gpu_hours"] > 0
    assert "zero_var_frac" in rep["grpo_history"][-1]
    # What the numbers depend on besides the config (README, "The main job"): the conftest fixture runs it
    # with --device cpu, and --quick sets speedrun.threads=1.
    assert rep["machine"]["device"] == "cpu" and rep["machine"]["torch_threads"] == 1 and rep["machine"]["cpu"]
    md = (run_dir / "report.md").read_text()
    assert "nanoseek chat --model" in md
    for name in ("loss", "reward", "accuracy", "expert_load"):
        assert (run_dir / "plots" / f"{name}.png").is_file(), name
        assert f"plots/{name}.png" in md


def test_exported_model_loads_with_tokenizer_and_template(run_dir):
    from nanoseek.data.tokenizer import load_tokenizer

    model_dir = json.loads((run_dir / "report.json").read_text())["model_dir"]
    model = nanoseek.load(model_dir)
    tok = load_tokenizer(model_dir)
    cfg = json.loads((run_dir / "model" / "tokenizer_config.json").read_text())
    assert "<think>" in cfg["chat_template"] and model.config.vocab_size >= tok.vocab_size
    out = nanoseek.generate(model, [tok.encode("1+2=?")], max_new_tokens=3)
    assert len(out[0]) == 3
    # The exported directory is a transformers model with the same logits, and its tokenizer loads there.
    transformers = require_module("transformers", "pip install 'transformers>=5,<6' (in the [dev] extra)")
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("Make 10 from 2 3 5")])
    assert hf_tok("Make 10 from 2 3 5", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        ours, theirs = model.float()(ids), hf(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


def test_clis_on_the_speedrun_model(run_dir, tmp_path):
    model = str(run_dir / "model")
    py = [sys.executable, "-m", "nanoseek.cli"]
    r = subprocess.run(py + ["eval", "--model", model, "--task", "arithmetic", "--n", "4", "--k", "2",
                             "--max-new-tokens", "24", "--json", "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n"] == 4 and res["k"] == 2 and 0 <= res["pass_at_1"] <= 1
    r = subprocess.run(py + ["sft", "--model", model, "--data", "arithmetic", "--n", "16", "--steps", "2",
                             "--batch-size", "4", "--out", str(tmp_path / "sft"), "--no-progress", "--threads", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sft" / "config.json").is_file() and (tmp_path / "sft" / "tokenizer.json").is_file()
    assert "sft step 2/2: loss " in r.stderr, r.stderr  # --no-progress: the loss as log lines, not hidden
    cfg = tmp_path / "g.toml"
    cfg.write_text("[grpo]\nG = 2\nprompts_per_step = 2\nmax_new_tokens = 16\n")
    r = subprocess.run(py + ["grpo", "--model", model, "--task", "arithmetic", "--out", str(tmp_path / "grpo"),
                             "--config", str(cfg), "--steps", "1", "--no-progress", "--threads", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grpo" / "final" / "config.json").is_file() and (tmp_path / "grpo" / "reward.png").is_file()
    assert "grpo step 1/1: reward " in r.stderr, r.stderr
    saved = json.loads((tmp_path / "grpo" / "grpo_config.json").read_text())
    assert saved["G"] == 2 and saved["steps"] == 1
    r = subprocess.run(py + ["grpo", "--model", model, "--out", str(tmp_path / "g2"), "--set", "nope=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr
    # A teacher that cannot be right: each answer is 10 CJK characters, 30 byte-level tokens for this
    # tokenizer (its merges come from ASCII text), more than --max-new-tokens allows. Distill must keep
    # nothing, say so, exit 1 and write no student. (A teacher that is right: tests/test_rl_train.py.)
    task = tmp_path / "impossible.jsonl"
    rows = [{"prompt": f"Make {t} from 2 3 5", "answer": "漢字" * 5, "split": "train"} for t in (6, 10, 13, 30)]
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = subprocess.run(py + ["distill", "--teacher", model, "--task", str(task), "--student-config", "tiny",
                             "--out", str(tmp_path / "student"), "--n", "4", "--k", "2", "--max-new-tokens", "24",
                             "--steps", "2", "--no-progress", "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "kept 0 of 8 samples (0.0%); 0 of 4 problems covered" in r.stderr, r.stderr
    assert "nanoseek distill: the teacher produced no verified-correct trace; nothing to train on" in r.stderr
    assert (tmp_path / "student" / "traces.jsonl").read_text() == ""
    assert not (tmp_path / "student" / "config.json").exists()
    r = subprocess.run(py + ["distill", "--teacher", model, "--task", "countdown", "--student-config", "nope",
                             "--out", str(tmp_path / "s2")], capture_output=True, text=True)
    assert r.returncode == 2 and "neither a preset" in r.stderr


# Held-out pass@1 of the default speedrun (configs/speedrun.toml: 200 Countdown problems x 4 samples) in
# the runs reported so far: pretrained 2.5%, after SFT 28.9-30.0%, after GRPO 48.9-50.5% (+20.0 and
# +20.5 points; README, and the reports of earlier sessions). The margins are half of those gains, well
# outside the run-to-run spread (the sampling noise of 800 samples alone is ~1.7 points).
SFT_OVER_BASE = 0.13
GRPO_OVER_SFT = 0.10
GRPO_AT_LEAST = 0.35


@pytest.mark.slow
def test_full_speedrun_headline_numbers(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "speedrun", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=3 * 3600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    base, sft, grpo = rep["accuracy_base"], rep["accuracy_before_rl"], rep["accuracy_after_rl"]
    summary = f"pretrained {base:.1%}, SFT {sft:.1%}, GRPO {grpo:.1%}; stages {rep['stage_seconds']}"
    print(summary)
    assert sft >= base + SFT_OVER_BASE, summary
    assert grpo >= sft + GRPO_OVER_SFT, summary
    assert grpo >= GRPO_AT_LEAST, summary
    assert rep["evals"]["grpo"]["n"] == 200 and rep["evals"]["grpo"]["k"] == 4
    assert f"held-out pass@1: {sft:.1%} after SFT -> {grpo:.1%} after GRPO" in r.stdout
    model = nanoseek.load(rep["model_dir"])
    assert model.config.num_hidden_layers == 4 and len(model.mtp) == 1  # the default plan's model, exported
