"""Cold-start SFT: the loss falls on assistant (completion) tokens only; data from tasks and JSONL chat files."""

import json

import pytest
import torch

from nanoseek.config import preset
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.chat import END_THINK, EOS, encode_sft, render_prompt
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer
from nanoseek.rl.sft import SFTConfig, completion_loss, load_sft_data, sft_tensors, sft_train


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus(300, seed=1), vocab_size=350)


def test_targets_cover_exactly_the_completion(tok):
    p1, c1 = encode_sft("3+4=?", "3+4=7", "7", tok)
    p2, c2 = encode_sft("12*2-5=?", "12*2=24\n24-5=19", "19", tok)
    ids, targets = sft_tensors([(p1, c1), (p2, c2)], tok.pad_id)
    for row, (p, c) in enumerate([(p1, c1), (p2, c2)]):
        kept = targets[row][targets[row] != -100].tolist()
        assert kept == c  # every completion token, in order, and nothing else
        assert (targets[row, :len(p) - 1] == -100).all()  # no loss on the user's turn
        full = p + c
        assert ids[row, :len(full) - 1].tolist() == full[:-1]
        pos = torch.nonzero(targets[row] != -100)[:, 0][:-1]
        assert (ids[row, pos + 1] == targets[row, pos]).all()  # targets are the next inputs
    assert targets[0, len(p1) + len(c1) - 1:].eq(-100).all()  # padding carries no loss
    assert tok.eos_id == c1[-1] and tok.end_think_id in c1


def test_prompt_tokens_get_no_gradient_signal(tok):
    """Changing the prompt-side targets cannot change the loss: only completion positions count."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    pair = encode_sft("3+4=?", "3+4=7", "7", tok)
    ids, targets = sft_tensors([pair], tok.pad_id)
    loss_a = model.forward_train(ids, targets, mtp_weight=0.0).lm_loss
    logits = model(ids)
    n_prompt = len(pair[0])
    manual = torch.nn.functional.cross_entropy(logits[0, n_prompt - 1:].float(), torch.tensor(pair[1]))
    assert loss_a.item() == pytest.approx(manual.item(), rel=1e-5)


def test_jsonl_formats_and_errors(tok, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "<think>2+2=4</think>4"}]},
        {"messages": [{"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}]},
        {"prompt": "2+5=?", "completion": f"2+5=7\n{END_THINK}\n7"},
        {"prompt": "2+6=?", "answer": "8", "solution": "2+6=8"},
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = load_sft_data(str(f), tok)
    assert len(pairs) == 4
    assert pairs[0][0] == render_prompt("2+2=?", tok)
    assert tok.decode(pairs[0][1]) == f"2+2=4\n{END_THINK}\n4{EOS}"
    assert tok.decode(pairs[1][1]) == f"2+3=5\n{END_THINK}\n5{EOS}"
    assert tok.decode(pairs[2][1]).endswith(EOS)
    assert tok.decode(pairs[3][1]) == f"2+6=8\n{END_THINK}\n8{EOS}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: the last message must be the assistant"):
        load_sft_data(str(bad), tok)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs a 'completion' or an 'answer'"):
        load_sft_data(str(bad), tok)
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        load_sft_data("no_such_task", tok)


def test_sft_on_a_task_lowers_the_completion_loss(tok, one_thread):
    pairs = load_sft_data("arithmetic", tok, n=64, difficulty=1, seed=0)
    assert all(p[-1] == tok.think_id or tok.decode(p).endswith("<think>\n") for p, _ in pairs)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    before = completion_loss(model, pairs, tok.pad_id)
    recs = sft_train(model, pairs, SFTConfig(steps=25, batch_size=16, lr=3e-3, warmup_steps=2, log_every=5),
                     tok.pad_id, progress=False)
    after = completion_loss(model, pairs, tok.pad_id)
    assert after < before - 1.0 and recs[-1]["step"] == 25
