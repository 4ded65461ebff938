"""Tokenizer: fixed special ids, round trips, streaming detokenization, and transformers parity."""

import pytest

from nanoseek.data.chat import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, render_prompt
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SAMPLES = [
    "Hello world, 12+7*3=33.",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n",
    "héllo naïve café — 日本語 🎉👍🏽",
    f"{USER}37+12*3-8=?{ASSISTANT}{THINK}\n12*3=36\n{END_THINK}\n65{EOS}",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = list(builtin_corpus(400, seed=0)) + ["héllo naïve café 日本語"] * 5
    train_tokenizer(texts, vocab_size=400, out_dir=d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_special_ids_are_fixed(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.hf.token_to_id(t) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.user_id == 3 and tok.assistant_id == 4 and tok.system_id == 5
    assert tok.think_id == 6 and tok.end_think_id == 7
    assert tok.vocab_size <= 400


def test_round_trip_and_specials(tok):
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode(f"a{THINK}b{END_THINK}c{EOS}")
    assert tok.think_id in ids and tok.end_think_id in ids and ids[-1] == tok.eos_id
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.decode(tok.encode(SAMPLES[4]), skip_special=True) == "37+12*3-8=?\n12*3=36\n\n65"
    # digits are single tokens: arithmetic is spelled out digit by digit
    assert len(tok.encode("12345")) == 5


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100, out_dir=tmp_path)


def test_stream_decoder_matches_decode(tok):
    for s in SAMPLES:
        ids = tok.encode(s)
        sd = tok.stream_decoder()
        pieces = [sd.push(i) for i in ids]
        assert "".join(pieces) + sd.flush() == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
    # an emoji is several byte tokens: nothing comes out until its last byte arrives
    ids = tok.encode("🎉")
    assert len(ids) > 1
    sd = tok.stream_decoder()
    assert [sd.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]
    sd = tok.stream_decoder(skip_special=True)
    assert "".join(sd.push(i) for i in tok.encode(f"{THINK}x{END_THINK}")) == "x"


def test_files_and_transformers_parity(tok_dir, tok):
    import json

    from transformers import AutoTokenizer

    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == BOS and cfg["eos_token"] == EOS and cfg["model_max_length"] > 0
    assert "chat_template" in cfg and (tok_dir / "special_tokens_map.json").is_file()

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.convert_tokens_to_ids([THINK, END_THINK]) == [tok.think_id, tok.end_think_id]
    for s in SAMPLES:
        assert hf(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
        assert hf(s)["input_ids"] == tok.encode(s, add_bos=True)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s))

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=?"},
            {"role": "assistant", "content": "2+2=4\n</think>\n4"}, {"role": "user", "content": "3+3=?"}]
    text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == f"{BOS}Be brief.{USER}2+2=?{ASSISTANT}4{EOS}{USER}3+3=?{ASSISTANT}{THINK}\n"
    ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == render_prompt(msgs, tok)
    no_gen = hf.apply_chat_template(msgs[:3], tokenize=False)
    assert no_gen.endswith(f"{ASSISTANT}4{EOS}")
