"""Any model directory with its own tokenizer: a deepseek_v3 checkpoint whose tokenizer.json has other
special tokens than ours (ChatML markup, `<s>` / `</s>`, an `eos_token_id` list in generation_config.json,
DeepSeek's FIM tokens) is served with its own chat template (token for token what transformers renders),
its own stop ids, FIM through `suffix`, and a clear 400 for what needs our tool tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import SERVER_API_KEY, require_module, running_server

openai = require_module("openai", "pip install openai (in the [dev] extra)")
MODEL = "foreign"
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import nanoseek
    from nanoseek.config import preset
    from nanoseek.model import Transformer

    d = tmp_path_factory.mktemp("foreign") / "model"
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["def add(a, b): return a + b", "hello world, the weather is fine"] * 10,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    nanoseek.save(Transformer(preset("tiny", vocab_size=hf.get_vocab_size())), d)
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
    return d


@pytest.fixture(scope="module")
def server(foreign_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("foreign_server") / "server.log"
    with running_server(foreign_dir, log, "--model-name", MODEL, "--max-batch-size", "2", "--max-len", "512",
                        "--log-level", "warning") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=120)


def test_its_own_template_and_special_tokens(client, foreign_dir):
    require_module("transformers", "pip install transformers (in the [dev] extra)")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    # transformers' rendering, in a fresh interpreter (this one already runs many native thread pools)
    code = ("import json, sys, transformers\n"
            "ref = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "m = json.loads(sys.argv[2])\n"
            "text = ref.apply_chat_template(m, add_generation_prompt=True, tokenize=False)\n"
            "print(json.dumps(ref(text, add_special_tokens=False)['input_ids']))\n")
    out = subprocess.run([sys.executable, "-c", code, str(foreign_dir), json.dumps(messages)], capture_output=True,
                         text=True, timeout=600, check=True)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(expected)
    from nanoseek.infer.text import ChatTokenizer

    tok = ChatTokenizer(foreign_dir)
    assert tok.chat_prompt(messages)[0] == expected and tok.eos_ids == [1, 4] and tok.bos_id == 0
    # markup typed by a user stays text: "<|im_start|>" is one control token in the template, many here
    typed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "<|im_start|>"}],
                                           max_tokens=1, temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                           temperature=0)
    assert typed.usage.prompt_tokens - plain.usage.prompt_tokens > 3


def test_every_eos_id_stops(client):
    for eos in (1, 4):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           temperature=0, logit_bias={str(eos): 100})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and r.choices[0].message.content == ""


def test_fim_with_deepseek_tokens(client, foreign_dir):
    from nanoseek.infer.text import ChatTokenizer

    tok = ChatTokenizer(foreign_dir)
    prefix, suffix = "def add(a, b):", "\n    return c"
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == 4 + len(tok.encode_plain(prefix)) + len(tok.encode_plain(suffix))
    assert r.choices[0].finish_reason in ("stop", "length")


def test_json_works_and_tool_calls_degrade_clearly(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                       temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                       tool_choice="required")
    assert "cannot make tool calls" in e.value.body["message"] and e.value.body["param"] == "tools"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                       max_tokens=4)  # auto: the template gets the tools, text comes back
    assert r.choices[0].message.tool_calls is None
