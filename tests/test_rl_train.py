"""A short GRPO run raises the reward on an easy task; exact resume; distillation keeps only correct traces."""

import copy
import json
import random

import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.tasks import load_jsonl_task
from nanoseek.data.chat import END_THINK, EOS, encode_sft, render_completion
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer
from nanoseek.rl.distill import rejection_sample, select_traces
from nanoseek.rl.sft import SFTConfig, sft_train
from nanoseek.rl.trainer import GRPOConfig, GRPOTrainer

# The easy task: every answer is 7. After SFT on uniformly random digits the model answers 7 about a
# tenth of the time, so GRPO has signal from the first step and only has to sharpen one distribution.
PROMPTS = [f"pick {w}" for w in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("easy")
    rows = [{"prompt": p, "answer": "7", "solution": "ok", "checker": "exact", "split": "train"} for p in PROMPTS]
    rows += [{"prompt": f"held {p}", "answer": "7", "solution": "ok", "checker": "exact", "split": "test"} for p in PROMPTS[:4]]
    path = root / "seven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_jsonl_task(path)
    corpus = [p for p in PROMPTS] + ["ok 0 1 2 3 4 5 6 7 8 9"] * 20
    tok = train_tokenizer(corpus, 300, root / "tok", min_frequency=1)
    # Seed-sensitive: with the nine tool tokens (a 9-row larger embedding, so another init) seed 0 collapses
    # to repeated newlines within 3-6 GRPO steps at lr 1e-3..3e-3, while seeds 1 and 2 learn at 3e-3.
    torch.manual_seed(2)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64))
    rng = random.Random(0)
    pairs = [encode_sft(p, "ok", str(rng.randrange(10)), tok) for p in PROMPTS for _ in range(8)]
    sft_train(model, pairs, SFTConfig(steps=80, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=2, mtp_weight=0.0),
              tok.pad_id, progress=False)
    return task, tok, model, root


def _cfg(**kw):
    base = dict(task="seven", steps=10, prompts_per_step=8, G=8, lr=3e-3, max_new_tokens=8, beta=0.001, seed=0)
    return GRPOConfig(**{**base, **kw})


def test_grpo_raises_reward_on_an_easy_task(setup):
    task, tok, sft_model, _ = setup
    model = copy.deepcopy(sft_model)
    hist = GRPOTrainer(model, tok, _cfg(), progress=False, task=task).train()
    first, last = hist[0], hist[-1]
    assert first["format"] > 0.8  # SFT taught the format; the answer is what RL must learn
    assert first["accuracy"] < 0.4
    assert sum(r["reward"] for r in hist[-2:]) / 2 > first["reward"] + 0.3
    for key in ("reward", "accuracy", "format", "response_length", "zero_var_frac", "kl", "clip_frac"):
        assert key in last
    assert last["kl"] > 0


def test_minibatches_make_clipping_act_and_resume_is_exact(setup, tmp_path):
    task, tok, sft_model, _ = setup
    # Clipping needs reward variance in the second minibatch's groups (with seed 0 the sampled groups that
    # have it all land in the first minibatch): seed 1 gives both minibatches signal.
    cfg = _cfg(steps=2, prompts_per_step=4, G=4, minibatches=2, save_every=1, clip_eps=0.05, seed=1)
    a = copy.deepcopy(sft_model)
    hist = GRPOTrainer(a, tok, cfg, out_dir=tmp_path / "a", progress=False, task=task).train()
    assert all(abs(r["ratio"] - 1) > 1e-3 for r in hist)  # the second minibatch is off-policy
    assert any(r["clip_frac"] > 0 for r in hist)
    b = copy.deepcopy(sft_model)
    GRPOTrainer(b, tok, _cfg(**{**cfg.__dict__, "steps": 1}), out_dir=tmp_path / "b", progress=False, task=task).train()
    b2 = copy.deepcopy(sft_model)  # a fresh process would start from the initial weights again
    tr = GRPOTrainer(b2, tok, cfg, out_dir=tmp_path / "b", progress=False, task=task)
    assert tr.resume() and tr.state.step == 1
    hist_b = tr.train()
    assert [r["step"] for r in hist_b] == [1, 2]
    assert hist_b[-1]["reward"] == hist[-1]["reward"]
    for (n, p), q in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.equal(p, q), n
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_select_traces_keeps_only_strict_correct_unique():
    task_rows = [{"prompt": "x", "answer": "7", "checker": "exact"}]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.jsonl"
        f.write_text(json.dumps(task_rows[0]) + "\n")
        ex = load_jsonl_task(f).rows[0]
    good = render_completion("ok", "7")
    texts = [[good, render_completion("ok", "8"), f"ok\n{END_THINK}\n7{END_THINK}\n7{EOS}", good, "7"]]
    assert select_traces([ex], texts) == [[0]]


def test_distillation_keeps_only_verified_traces(setup):
    task, tok, sft_model, _ = setup
    pairs, rows, stats = rejection_sample(sft_model, tok, task, n=8, k=6, max_new_tokens=8, temperature=1.0, seed=1)
    assert stats.sampled == 48 and 0 < stats.kept <= stats.correct < stats.sampled
    assert len(pairs) == len(rows) == stats.kept
    for (prompt, completion), row in zip(pairs, rows):
        assert row["completion"].endswith(f"{END_THINK}\n7{EOS}")
        assert tok.decode(completion) == row["completion"]
    student = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64))
    recs = sft_train(student, pairs, SFTConfig(steps=3, batch_size=8), tok.pad_id, progress=False)
    assert recs[-1]["step"] == 3


def test_distill_cli_trains_the_student_on_the_kept_traces(chat_model_dir, tmp_path):
    """`nanoseek distill` with a teacher that is right: the conftest chat model answers every greeting with
    CHAT_ANSWER under greedy decoding, so each problem keeps exactly one trace (k identical samples are
    one trace), and the student is trained on them and saved."""
    import subprocess
    import sys

    import nanoseek
    from conftest import CHAT_ANSWER, CHAT_QUESTIONS

    task = tmp_path / "greet.jsonl"
    task.write_text("".join(json.dumps({"prompt": q, "answer": CHAT_ANSWER, "split": "train"}) + "\n"
                            for q in CHAT_QUESTIONS))
    out = tmp_path / "student"
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "distill", "--teacher", str(chat_model_dir),
                        "--task", str(task), "--student-config", "tiny", "--out", str(out),
                        "--n", str(len(CHAT_QUESTIONS)), "--k", "2", "--temperature", "0", "--max-new-tokens", "64",
                        "--steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1"],
                       capture_output=True, text=True)
    n = len(CHAT_QUESTIONS)
    assert r.returncode == 0, r.stderr
    assert f"kept {n} of {2 * n} samples (50.0%); {n} of {n} problems covered" in r.stderr, r.stderr
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert sorted(row["prompt"] for row in rows) == sorted(CHAT_QUESTIONS)
    assert all(row["completion"].endswith(f"{END_THINK}\n\n{CHAT_ANSWER}{EOS}") for row in rows)
    stats = json.loads((out / "distill.json").read_text())
    assert stats["kept"] == n and stats["problems_covered"] == n and stats["correct"] == 2 * n
    student, teacher = nanoseek.load(out), nanoseek.load(chat_model_dir)
    assert student.config.hidden_size == 64  # the tiny preset
    assert not torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)  # a new model, trained
    assert (out / "tokenizer.json").read_bytes() == (chat_model_dir / "tokenizer.json").read_bytes()
