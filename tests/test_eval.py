"""Evaluation metrics on hand-made samples: pass@1 as the mean over k samples, cons@k by majority vote."""

import pytest

from nanoseek.data.tasks import get_task
from nanoseek.rl.evaluate import answer_key, cons_at_k, majority_answer, pass_at_1

ARITH = get_task("arithmetic").examples("test", 3, seed=0)


def test_pass_at_1_is_the_mean_over_samples_then_problems():
    assert pass_at_1([[True, False, False, False], [True, True, True, True]]) == pytest.approx((0.25 + 1.0) / 2)
    assert pass_at_1([[False], [True]]) == 0.5
    assert pass_at_1([]) == 0.0
    with pytest.raises(ValueError, match="no samples"):
        pass_at_1([[True], []])


def test_majority_vote():
    assert majority_answer(["3", "4", "4", "3.0", "3"]) == "3"  # 3 votes for 3 (3.0 is the same number)
    assert majority_answer(["", "7", "", " "]) == "7"            # empty answers do not vote
    assert majority_answer(["", ""]) is None
    assert majority_answer(["5", "6"]) == "5"                    # a tie goes to the first seen
    assert answer_key("1,000") == answer_key("1000") and answer_key("a  b") == "a b"


def test_cons_at_k_checks_the_majority_answer():
    a, b, c = ARITH
    right = [a.answer, b.answer, c.answer]
    wrong = [str(int(x) + 1) for x in right]
    answers = [
        [right[0], wrong[0], right[0], ""],   # majority right
        [wrong[1], wrong[1], right[1], ""],   # majority wrong although one sample is right
        ["", "", "", ""],                     # no answer at all
    ]
    assert cons_at_k(answers, ARITH) == pytest.approx(1 / 3)
    correct = [[x == r for x in row] for row, r in zip(answers, right)]
    assert pass_at_1(correct) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    with pytest.raises(ValueError, match="answer lists"):
        cons_at_k(answers[:2], ARITH)
