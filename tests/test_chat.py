"""The R1 chat format: prompt rendering, strict completion parsing, and the streaming reasoning split the
server uses (infer.text.TextStream)."""

import pytest

from nanoseek.data.chat import (ASSISTANT, BOS, EOS, THINK, USER, encode_sft, parse_completion,
                                render_completion, render_prompt, transcript_text)
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.text import ChatTokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus(300, seed=1), vocab_size=350)


@pytest.fixture(scope="module")
def chat_tok(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    tok.save(d)
    return ChatTokenizer(d)


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


def _split(chat_tok, text: str, think_opened: bool, final: bool = True, stop=()) -> tuple[str, str]:
    """(reasoning, content) of generated text fed to the server's TextStream in one piece."""
    stream = chat_tok.stream(think_opened=think_opened, stop=list(stop))
    stream.feed(chat_tok.encode(text), final=final)
    return stream.reasoning, stream.content


def test_split_reasoning_modes(chat_tok):
    assert _split(chat_tok, "thinking\n</think>\nanswer" + EOS, True) == ("thinking", "answer")
    assert _split(chat_tok, "<think>\nthinking\n</think>\nanswer", False) == ("thinking", "answer")
    assert _split(chat_tok, "plain answer", False) == ("", "plain answer")
    assert _split(chat_tok, "still thinking", True) == ("still thinking", "")
    # Mid-stream, a half-generated tag is held back: it may still become </think> or <think>.
    assert _split(chat_tok, "still thinking </thi", True, final=False) == ("still thinking", "")
    assert _split(chat_tok, "<thi", False, final=False) == ("", "")
    # Stop strings cut the answer only, never the reasoning.
    assert _split(chat_tok, "step 7\n</think>\nthe answer is 7 ok", True, stop=["7"]) == ("step 7", "the answer is ")


def test_reasoning_tokens_are_counted_only_inside_think(chat_tok):
    s = chat_tok.stream(think_opened=True)
    s.feed(chat_tok.encode("a b c\n</think>\n"))
    n_reasoning = s.reasoning_tokens
    s.feed(chat_tok.encode("answer"), final=True)
    # Counted through </think>, and not one more after it.
    assert n_reasoning == len(chat_tok.encode("a b c\n</think>")) and s.reasoning_tokens == n_reasoning
    plain = chat_tok.stream(think_opened=False)
    plain.feed(chat_tok.encode("no reasoning here"), final=True)
    assert plain.reasoning_tokens == 0 and plain.content == "no reasoning here"


@pytest.mark.parametrize("opened,full", [
    (True, "step 1\nstep 2\n</think>\nthe answer is 7" + EOS),
    (False, "<think>\nhmm </ok\n</think>\n  7"),
    (False, "just content <b>x</b>"),
    (True, "ünï 漢字 </thin k\n</think>\n é 字"),  # multi-byte characters split across tokens
])
def test_split_reasoning_does_not_depend_on_how_tokens_arrive(chat_tok, opened, full):
    whole = _split(chat_tok, full, opened)
    stream = chat_tok.stream(think_opened=opened)
    ids = chat_tok.encode(full)
    for k, t in enumerate(ids):  # one token at a time: the worst case for partial tags and characters
        d = stream.feed([t], final=k == len(ids) - 1)
        assert "\ufffd" not in d.reasoning + d.content
    assert (stream.reasoning, stream.content) == whole
