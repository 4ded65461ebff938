"""The R1 chat format: prompt rendering, strict completion parsing, streaming reasoning split."""

import pytest

from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, train_tokenizer
from nanoseek.rl.chat import (encode_sft, parse_completion, render_completion, render_prompt, split_reasoning,
                              transcript_text)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus(300, seed=1), vocab_size=350)


def test_render_prompt_opens_think(tok):
    ids = render_prompt("12+7*3=?", tok)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[-3:] == [tok.assistant_id, tok.think_id, *tok.encode("\n")]
    assert tok.decode(ids) == f"{BOS}{USER}12+7*3=?{ASSISTANT}{THINK}\n"
    with_sys = render_prompt("q", tok, system="S")
    assert tok.decode(with_sys) == f"{BOS}S{USER}q{ASSISTANT}{THINK}\n"
    with pytest.raises(ValueError, match="role"):
        render_prompt([{"role": "robot", "content": "x"}], tok)


def test_sft_pieces_tokenize_like_the_whole_transcript(tok):
    reasoning = "7*3=21\n12+21=33"
    p, c = encode_sft("12+7*3=?", reasoning, "33", tok)
    assert c[-1] == tok.eos_id and tok.end_think_id in c
    assert p + c == tok.encode(BOS + transcript_text("12+7*3=?", reasoning, "33") + EOS)


def test_parse_round_trip():
    p = parse_completion(render_completion("step one\nstep two", "42"))
    assert p == type(p)(reasoning="step one\nstep two", answer="42", well_formed=True)
    # a leading <think> the model wrote itself is fine
    assert parse_completion("<think>\nr\n</think>\n42" + EOS).well_formed
    # no end token: cut off at the length limit, not a finished answer (the answer is still parsed)
    truncated = parse_completion("r\n</think>\n4")
    assert not truncated.well_formed and truncated.answer == "4"


@pytest.mark.parametrize("text", [
    "r\n</think>\n42</think>" + EOS,          # repeated closing tag
    "r</think></think>42" + EOS,
    "r\n42" + EOS,                             # never closes the think block
    "\n</think>\n42" + EOS,                    # empty reasoning
    "r\n</think>\n" + EOS,                     # empty answer
    "r\n</think>\n42" + EOS + "more",          # text after eos
    "r\n</think>\n42" + EOS + EOS,
    "r <think> s\n</think>\n42" + EOS,         # <think> not at the start
    "<think><think>r\n</think>\n42" + EOS,     # repeated opening tag
    "r\n</think>\n42" + USER + "next" + EOS,   # role tokens leaking into the completion
    "r\n</think>\n42" + BOS,
])
def test_parse_rejects_format_hacks(text):
    assert not parse_completion(text).well_formed


def test_parse_answer_is_empty_when_ambiguous():
    assert parse_completion("a</think>1</think>2").answer == ""
    assert parse_completion("no tags at all").answer == ""


def test_split_reasoning_modes():
    assert split_reasoning("thinking\n</think>\nanswer" + EOS, think_opened=True) == ("thinking", "answer")
    assert split_reasoning("<think>\nthinking\n</think>\nanswer", think_opened=False) == ("thinking", "answer")
    assert split_reasoning("plain answer", think_opened=False) == ("", "plain answer")
    assert split_reasoning("still thinking", think_opened=True) == ("still thinking", "")
    assert split_reasoning("still thinking </thi", think_opened=True) == ("still thinking", "")
    assert split_reasoning("<thi", think_opened=False) == ("", "")


@pytest.mark.parametrize("opened,full", [
    (True, "step 1\nstep 2\n</think>\nthe answer is 7" + EOS),
    (False, "<think>\nhmm </ok\n</think>\n  7"),
    (False, "just content <b>x</b>"),
])
def test_split_reasoning_streams_monotonically(opened, full):
    # Character by character (the worst case for partial tags): each output extends the previous one.
    final = split_reasoning(full, opened)
    prev = ("", "")
    for k in range(len(full) + 1):
        cur = split_reasoning(full[:k], opened)
        assert cur[0].startswith(prev[0]) and cur[1].startswith(prev[1]), (k, prev, cur)
        assert final[0].startswith(cur[0]) and final[1].startswith(cur[1])
        prev = cur
    assert prev == final
