"""A V3.2 model served end to end: `nanoseek convert --to v3.2` of the chat fixture's model, served by a
real `nanoseek serve` process with MTP speculation, driven by the real `openai` client; its greedy tokens
are those of the uncached full forward (prompts longer than index_topk, so the indexer selects)."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from conftest import SERVER_API_KEY, require_module, running_server
from test_engine import greedy_reference

openai = require_module("openai", "pip install openai (in the [dev] extra)")


@pytest.mark.usefixtures("one_thread")
def test_server_on_a_converted_v32_model(chat_model_dir, tmp_path):
    from nanoseek.cli import main
    from nanoseek.infer.text import ChatTokenizer

    out = tmp_path / "v32"
    assert main(["convert", "--model", str(chat_model_dir), "--to", "v3.2", "--out", str(out), "--index-topk", "8",
                 "--index-n-heads", "4", "--index-head-dim", "16"]) == 0
    model = nanoseek.load(out, dtype=torch.float32)
    assert model.config.is_dsa and model.cache_layout()[1]["index_key"] == 16
    tok = ChatTokenizer(out)
    prompt = tok.encode("the quick brown fox jumps over the lazy dog, the quick brown fox")
    assert len(prompt) > 2 * model.config.index_topk
    n = 16
    want = greedy_reference(model, prompt, n)
    if tok.eos_id in want:  # the server ends at EOS and does not show it
        want = want[: want.index(tok.eos_id) + 1]
    with running_server(out, tmp_path / "server.log", "--model-name", "v32", "--speculative", "--max-len", "128",
                        "--max-batch-size", "2", "--dtype", "float32", "--log-level", "warning") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=120)
        r = client.completions.create(model="v32", prompt=prompt, max_tokens=n, temperature=0)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want)
    assert r.choices[0].text == tok.decode(want)
