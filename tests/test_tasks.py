"""Verifiable tasks: determinism, disjoint splits, correct worked solutions, adversarial checker inputs."""

import json

import pytest

from nanoseek.data.tasks import (TASKS, check_countdown, get_task, load_jsonl_task, parse_expression,
                                 solve_countdown, split_of)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_seeded(name):
    t = get_task(name)
    a = t.examples("train", 50, seed=1)
    assert a == t.examples("train", 50, seed=1)
    assert a != t.examples("train", 50, seed=2)
    assert len({e.prompt for e in a}) == 50


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_splits_are_disjoint_and_answers_check(name, difficulty):
    t = get_task(name)
    train = [e for s in range(3) for e in t.examples("train", 200, seed=s, difficulty=difficulty)]
    test = [e for s in range(3) for e in t.examples("test", 100, seed=s, difficulty=difficulty)]
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert all(split_of(name, e.prompt) == "test" for e in test)
    for e in train + test:
        assert e.task == name and e.solution and t.check(e.answer, e), e
        assert len(e.prompt) <= 40 or not t.in_corpus  # short prompts: tiny models must learn them (passkey is long)


def test_arithmetic_answers_and_steps_are_right():
    for e in get_task("arithmetic").examples("test", 200, difficulty=2):
        value, _ = parse_expression(e.prompt.removesuffix("=?"))
        assert str(value) == e.answer
        for step in e.solution.splitlines():  # every worked step is itself true
            lhs, rhs = step.rsplit("=", 1)
            assert str(eval_step(lhs)) == rhs
        assert e.solution.splitlines()[-1].endswith("=" + e.answer)


def eval_step(lhs: str) -> int:
    # one binary operation whose left operand may be negative
    for i in range(1, len(lhs)):
        if lhs[i] in "+-*":
            a, op, b = int(lhs[:i]), lhs[i], int(lhs[i + 1:])
            return a + b if op == "+" else a - b if op == "-" else a * b
    raise AssertionError(lhs)


def test_difficulty_knob_grows_problems():
    sizes = [len(get_task("arithmetic").examples("train", 1, difficulty=d)[0].prompt.replace("=?", "")) for d in (1, 4)]
    assert sizes[0] < sizes[1]
    n1 = len(get_task("countdown").examples("train", 1, difficulty=1)[0].meta["numbers"])
    n2 = len(get_task("countdown").examples("train", 1, difficulty=2)[0].meta["numbers"])
    assert n1 < n2


def test_arithmetic_checker():
    e = get_task("arithmetic").examples("train", 1)[0]
    ans = e.answer
    t = get_task("arithmetic")
    for ok in (ans, f" {ans} ", f"{ans}.", f"+{ans}" if not ans.startswith("-") else ans):
        assert t.check(ok, e), ok
    for bad in ("", str(int(ans) + 1), "abc", f"{ans} {ans}", f"{ans}x", "1e9"):
        assert not t.check(bad, e), bad


def test_countdown_solver_and_checker():
    expr, steps = solve_countdown([3, 5, 7], 22)
    assert check_countdown(expr, [3, 5, 7], 22) and steps[-1].endswith("=22")
    assert solve_countdown([2, 2], 99) is None
    nums, target = [25, 4, 3], 97
    assert check_countdown("25*4-3", nums, target)
    assert check_countdown("(25*4)-3 = 97", nums, target)
    assert check_countdown("25×4−3".replace("−", "-"), nums, target)
    adversarial = [
        "25*4-3=98",                       # wrong claimed result
        "25*4-3=97=97",
        "25*4*4-3",                        # 4 used twice
        "100-3",                           # 100 is not given
        "97",                              # the target alone
        "__import__('os').system('true')", # code, not arithmetic
        "25*4-3 or 1", "25**4", "-3+100", "25*4-3.0", "1e2-3", "(25*4-3", "25*4-3)", "",
        "3/2*25*4", "25/0", "(" * 500 + "97" + ")" * 500, "1+" * 200 + "1",
    ]
    for text in adversarial:
        assert not check_countdown(text, nums, target), text
    assert check_countdown("6/3*4", [6, 3, 4], 8)
    assert not check_countdown("7/2*2", [7, 2, 2], 7)  # inexact division is not allowed


def test_jsonl_task(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"q{i}", "answer": str(i), "checker": "numeric"} for i in range(40)]
    rows.append({"prompt": "Make 10 from 2 5", "answer": "10", "checker": "countdown", "numbers": [2, 5], "split": "test"})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = load_jsonl_task(f)
    assert t.name == "mine" and get_task(str(f)).rows == t.rows
    train, test = t.examples("train", 100), t.examples("test", 100)
    assert len(train) == 100 and 0 < len(test) < 41
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    cd = next(e for e in t.rows if e.meta["checker"] == "countdown")
    assert cd in test and t.check("2*5", cd) and not t.check("2*5*5", cd)
    assert t.check("7.0", next(e for e in t.rows if e.prompt == "q7"))


@pytest.mark.parametrize("line,match", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('["a"]', r":2: expected a JSON object"),
    ('{"prompt": "x"}', r":2: missing or empty 'answer'"),
    ('{"prompt": "", "answer": "1"}', r":2: missing or empty 'prompt'"),
    ('{"prompt": "x", "answer": "1", "checker": "llm"}', r":2: unknown checker 'llm'"),
    ('{"prompt": "x", "answer": "one", "checker": "numeric"}', r":2: checker 'numeric' needs a numeric answer"),
    ('{"prompt": "x", "answer": "3", "checker": "countdown"}', r":2: checker 'countdown' needs 'numbers'"),
    ('{"prompt": "x", "answer": "3", "split": "dev"}', r":2: split must be one of"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl_task(f)


def test_unknown_task_and_bad_split():
    with pytest.raises(KeyError, match="arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").examples("valid", 3)


def test_program_task_answers_come_from_running_the_snippet():
    t = get_task("program")
    exs = t.examples("train", 40, seed=0, difficulty=2)
    assert exs == t.examples("train", 40, seed=0, difficulty=2)
    for e in exs:
        assert e.solution.splitlines()[-1].endswith(e.answer) and t.check(f" {e.answer}\n", e)
        assert not t.check(e.answer + "0", e)


def test_sandbox_limits():
    from nanoseek.data.tasks.program import run_sandboxed

    out = run_sandboxed([
        "print(1)",
        "while True: pass",                           # CPU limit
        "x = bytearray(8 << 30)",                     # memory limit
        "import os; os.system('echo leaked')",        # cannot corrupt the result channel
        "raise ValueError('boom')",
        "print(2)",
    ], cpu_s=1)
    assert out == ["1\n", None, None, "", None, "2\n"]
