"""The passkey-retrieval task: lengths, depth, the key as the only number, checker and rewards."""

import random
import re

import pytest

from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tasks.passkey import MAX_DIFFICULTY, make_passkey, words_for
from nanoseek.data.tasks import check_answer, get_task
from nanoseek.data.chat import render_completion
from nanoseek.rl.rewards import accuracy_reward, combined_reward

TASK = get_task("passkey")


@pytest.mark.parametrize("difficulty", range(1, MAX_DIFFICULTY + 1))
def test_lengths_double_up_to_16k_words(difficulty):
    ex = TASK.examples("test", 1, seed=difficulty, difficulty=difficulty)[0]
    words = words_for(difficulty)
    assert words == 256 * 2 ** (difficulty - 1)
    assert words <= ex.meta["words"] < words + 12  # filler words, whole sentences
    # the key is the only number in the prompt, and it sits in the one sentence that names it
    assert re.findall(r"\d+", ex.prompt) == [ex.answer, ex.answer]
    assert f"The pass key is {ex.answer}." in ex.prompt and ex.prompt.endswith("What is the pass key?")
    assert TASK.check(ex.answer, ex) and not TASK.check(str(int(ex.answer) + 1), ex)


def test_depth_is_where_the_key_sits():
    rng = random.Random(0)
    for depth in (0.0, 0.25, 0.5, 1.0):
        ex = make_passkey(rng, 2000, depth=depth, key=12345)
        text = ex.prompt.split("\n")[1]
        at = text.index("The pass key is 12345.") / len(text)
        assert abs(at - depth) < 0.02 and abs(ex.meta["depth"] - depth) < 0.01
    depths = [e.meta["depth"] for e in TASK.examples("train", 200, seed=0, difficulty=1)]
    assert min(depths) < 0.1 and max(depths) > 0.9  # uniform over the text
    with pytest.raises(ValueError, match="depth"):
        make_passkey(rng, 100, depth=1.5)
    with pytest.raises(ValueError, match="difficulty"):
        TASK.examples("train", 1, difficulty=MAX_DIFFICULTY + 1)


def test_rewards_and_checker():
    ex = TASK.examples("train", 1, seed=3, difficulty=2)[0]
    good = render_completion(ex.solution, ex.answer)
    assert accuracy_reward(good, ex) == 1.0 and combined_reward(good, ex) == 1.0
    assert combined_reward(render_completion(ex.solution, "10000"), ex) == pytest.approx(0.1)
    assert check_answer(f" {ex.answer}.", ex) and not check_answer("the key", ex)


def test_not_in_the_pretraining_corpus():
    assert not TASK.in_corpus
    assert not any("pass key" in doc for doc in builtin_corpus(300))


def test_passkey_benchmark_quick_pipeline(tmp_path):
    """benchmarks/bench_passkey.py --quick for real: pretrain, LM, SFT, eval, convert, both V3.2 stages, the
    dense control, the JSON.
    (A pipeline check on a few steps: the accuracies of the full run are in benchmarks/results/passkey.json.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "passkey.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_passkey", "--quick", "--work", str(tmp_path / "work"),
                        "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] and r["machine"]["threads"] == 1 and r["index_topk"] == r["settings"]["index_topk"]
    words = [str(w) for w in r["eval"]["words"]]
    assert len(words) >= 2 and r["eval"]["n"] >= 1
    # selection matters: every evaluation prompt is longer than the indexer's top-k
    assert all(r["eval"]["prompt_tokens"][w] > 2 * r["index_topk"] for w in words)
    assert set(r["results"]) == {"dense", "converted", "warmup", "sparse", "dense_control"}
    for stage in r["results"].values():
        assert set(stage["accuracy"]) == set(words) and all(0.0 <= stage["accuracy"][w] <= 1.0 for w in words)
        assert all(len(stage["by_depth"][w]) == 3 for w in words)
    for stage in ("warmup", "sparse"):
        kl = r["indexer_kl"][stage]
        assert kl["steps"] == r["settings"][f"{stage}_steps"] and kl["first"] > 0 and kl["last"] > 0
        assert kl["loss_first"] > 0 and kl["loss_last"] > 0
    # the control trains the dense model like the sparse stage: same steps, no indexer
    control = r["training"]["dense_control"]
    assert control["steps"] == r["settings"]["sparse_steps"] and "first" not in control and control["loss_last"] > 0
    assert r["training"]["lm"]["steps"] == r["settings"]["lm_steps"]
    assert {"pretrain", "lm", "sft", "convert", "warmup", "sparse", "dense_control", "eval", "total"} <= set(r["seconds"])
    # each phase went through the CLI: the converted model is V3.2 with the requested top-k
    argvs = [c["argv"][1] for c in r["commands"]]
    assert argvs.count("eval") == 5 * len(words) and "convert" in argvs and argvs.count("train") == 5
    config = json.loads((tmp_path / "work" / "v32" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["index_topk"] == r["index_topk"]
    run_cfg = json.loads((tmp_path / "work" / "sparse" / "run_config.json").read_text())
    assert run_cfg["dsa"]["stage"] == "sparse"
    control_cfg = json.loads((tmp_path / "work" / "dense_control" / "run_config.json").read_text())
    assert control_cfg["dsa"]["stage"] == "off" and control_cfg["train"]["steps"] == r["settings"]["sparse_steps"]
    assert "| dense V3 |" in p.stdout and "| after sparse training |" in p.stdout and "| control: dense V3" in p.stdout
