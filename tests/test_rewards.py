"""Rewards: accuracy through the task checkers, strict format, TinyZero's combined shaping."""

import json

import pytest

from nanoseek.data.tasks import get_task, load_jsonl_task
from nanoseek.data.chat import EOS, USER, render_completion
from nanoseek.rl.rewards import REWARDS, accuracy_reward, combined_reward, format_reward

ARITH = get_task("arithmetic").examples("train", 1, seed=3)[0]
CD = get_task("countdown").examples("train", 1, seed=3)[0]


def test_correct_wrong_and_shaping():
    good = render_completion(ARITH.solution, ARITH.answer)
    wrong = render_completion(ARITH.solution, str(int(ARITH.answer) + 1))
    assert accuracy_reward(good, ARITH) == 1.0 and format_reward(good, ARITH) == 1.0
    assert combined_reward(good, ARITH) == 1.0
    assert accuracy_reward(wrong, ARITH) == 0.0 and format_reward(wrong, ARITH) == 1.0
    assert combined_reward(wrong, ARITH) == pytest.approx(0.1)
    assert combined_reward(good, ARITH, {"accuracy": 1.0, "format": 0.5}) == 1.5
    assert combined_reward(wrong, ARITH, {"accuracy": 1.0, "format": 0.5}) == 0.5
    with pytest.raises(KeyError, match="unknown rewards"):
        combined_reward(good, ARITH, {"length": 1.0})
    assert set(REWARDS) == {"accuracy", "format"}


@pytest.mark.parametrize("make", [
    lambda r, a: f"{r}\n</think>\n{a}</think>\n{a}{EOS}",      # repeated </think>
    lambda r, a: f"{r}\n{a}{EOS}",                             # missing </think>
    lambda r, a: f"\n</think>\n{a}{EOS}",                      # empty reasoning
    lambda r, a: f"{r}\n</think>\n{a}{EOS}{a}",                # text after eos
    lambda r, a: f"{r}\n</think>\n{a}{USER}",                  # role token
    lambda r, a: f"{r}<think>\n</think>\n{a}{EOS}",            # stray <think>
])
def test_format_hacks_earn_nothing(make):
    text = make(ARITH.solution, ARITH.answer)
    assert format_reward(text, ARITH) == 0.0
    assert combined_reward(text, ARITH) == 0.0


def test_accuracy_needs_an_unambiguous_answer():
    assert accuracy_reward(f"x</think>{ARITH.answer}</think>{ARITH.answer}", ARITH) == 0.0
    assert accuracy_reward(ARITH.answer, ARITH) == 0.0  # no think block at all: nothing parsed
    # a stripped eos still counts (engines may drop the stop token)
    assert accuracy_reward(f"r\n</think>\n{ARITH.answer}", ARITH) == 1.0


def test_countdown_accepts_any_valid_expression():
    nums, target = list(CD.meta["numbers"]), CD.meta["target"]
    assert combined_reward(render_completion("r", CD.answer), CD) == 1.0
    cheat = "+".join([str(target)])  # the target itself is not one of the numbers
    assert target not in nums and accuracy_reward(render_completion("r", cheat), CD) == 0.0
    reuse = "*".join(str(nums[0]) for _ in range(len(nums) + 2))
    assert accuracy_reward(render_completion("r", reuse), CD) == 0.0


def test_jsonl_examples_use_their_checker(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "half of 7?", "answer": "3.5", "checker": "numeric", "split": "train"},
        {"prompt": "capital of France?", "answer": "Paris", "split": "train"},
    ]))
    ex_num, ex_exact = load_jsonl_task(f).rows
    assert accuracy_reward(render_completion("r", "7/2"), ex_num) == 1.0
    assert accuracy_reward(render_completion("r", "Paris"), ex_exact) == 1.0
    assert accuracy_reward(render_completion("r", "paris"), ex_exact) == 0.0
