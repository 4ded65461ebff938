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
