"""`nanoseek convert --to v3.2`: a V3 checkpoint plus fresh DSA indexers, loadable by nanoseek and transformers;
with index_topk >= the sequence length the converted model computes the V3 logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.cli import main
from nanoseek.config import preset

transformers = pytest.importorskip("transformers")
needs_v32 = pytest.mark.skipif(not hasattr(transformers, "DeepseekV32ForCausalLM"),
                               reason=f"transformers {transformers.__version__} has no DeepseekV32ForCausalLM")
TOPK = 48  # the tests' sequences are at most this long unless they want selection to matter


def _source(tmp_path, **overrides):
    torch.manual_seed(0)
    model = nanoseek.Transformer(preset("tiny", initializer_range=0.1, **overrides)).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.2)
    path = nanoseek.save(model, tmp_path / "v3")
    (path / "tokenizer.json").write_text('{"stand-in": "tokenizer"}')
    return model, path


def _convert(src, out, *extra):
    return main(["convert", "--model", str(src), "--to", "v3.2", "--out", str(out), "--index-topk", str(TOPK),
                 "--index-n-heads", "4", "--index-head-dim", "16", *extra])


def _ids(vocab, T, seed=0):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@needs_v32
def test_convert_tiny_to_v32(tmp_path, one_thread, capsys):
    v3, src = _source(tmp_path)
    out = tmp_path / "v32"
    assert _convert(src, out, "--seed", "3") == 0
    assert "deepseek_v32" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (cfg["index_topk"], cfg["index_n_heads"], cfg["index_head_dim"]) == (TOPK, 4, 16)
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert not list(tmp_path.glob("*.converting"))

    model = nanoseek.load(out)
    assert model.config.is_dsa and len(model.mtp) == 1 and model.tokenizer_dir == str(out)
    idx = model.mtp[0].self_attn.indexer  # the MTP layer got one too
    assert torch.equal(idx.k_norm.weight, torch.ones(16)) and torch.equal(idx.k_norm.bias, torch.zeros(16))
    wq = model.layers[2].self_attn.indexer.wq_b.weight
    assert abs(wq.std().item() - 0.1) < 0.01 and abs(wq.mean().item()) < 0.01  # N(0, initializer_range)
    for n, p in v3.state_dict().items():  # every V3 tensor unchanged
        assert torch.equal(model.state_dict()[n], p), n

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(v3.config.vocab_size, TOPK)
    with torch.no_grad():
        dense = v3(ids)
        assert torch.equal(model(ids), dense)  # sparse over every token = dense
        assert ((hf(ids).logits - dense).abs().max() / dense.abs().max()).item() < 1e-5
        long = _ids(v3.config.vocab_size, 3 * TOPK, seed=1)
        assert not torch.allclose(model(long), v3(long), atol=1e-4)  # past index_topk the indexer chooses

    # the same seed gives the same indexers, another seed others
    again, other = tmp_path / "again", tmp_path / "other"
    assert _convert(src, again, "--seed", "3") == 0 and _convert(src, other, "--seed", "4") == 0
    a, b, c = (nanoseek.load(p).state_dict()["layers.1.self_attn.indexer.wk.weight"] for p in (out, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


@needs_v32
def test_convert_half_split_rope_source(tmp_path, one_thread):
    """transformers' deepseek_v32 rotates MLA's rope interleaved: a half-split V3 source is re-laid."""
    v3, src = _source(tmp_path, rope_interleave=False)
    out = tmp_path / "v32"
    assert _convert(src, out) == 0
    assert json.loads((out / "config.json").read_text())["rope_interleave"] is True
    model = nanoseek.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(v3.config.vocab_size, TOPK)
    with torch.no_grad():
        dense = v3(ids)
        for logits in (model(ids), hf(ids).logits):
            assert ((logits - dense).abs().max() / dense.abs().max()).item() < 1e-5


def test_convert_fp8_source(tmp_path, one_thread):
    """An FP8 V3 checkpoint stays FP8; the new wq_b / wk are FP8 + weight_scale_inv as DeepSeek publishes."""
    from nanoseek.train.fp8 import quantize_blocks

    _, src = _source(tmp_path, hidden_size=160, q_lora_rank=136)
    tensors = load_file(str(src / "model.safetensors"))
    for k in list(tensors):
        if k.endswith("proj.weight") and ".mlp.gate." not in k and tensors[k].dim() == 2:
            q, s = quantize_blocks(tensors[k])
            tensors[k], tensors[k[: -len("weight")] + "weight_scale_inv"] = q.contiguous(), s
    save_file(tensors, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "v32"
    assert _convert(src, out) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    pre = "model.layers.1.self_attn.indexer."
    with safe_open(str(out / index[pre + "wq_b.weight"]), "pt") as f:
        assert f.get_tensor(pre + "wq_b.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(pre + "wk.weight_scale_inv").shape == (1, 2)  # [16, 160] in 128x128 blocks
        assert f.get_tensor(pre + "weights_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor(pre + "k_norm.bias").dtype == torch.float32
    with safe_open(str(out / index["model.layers.1.self_attn.q_b_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.q_b_proj.weight").dtype == torch.float8_e4m3fn
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    ids = _ids(512, TOPK)
    with torch.no_grad():
        assert torch.equal(nanoseek.load(out, dtype=torch.float32)(ids), nanoseek.load(src, dtype=torch.float32)(ids))


@pytest.mark.parametrize("case, message", [
    ("missing", "not a directory"),
    ("no_config", "not a model directory"),
    ("already", "already a V3.2"),
    ("out_not_empty", "not an empty directory"),
    ("no_q_lora", "q_lora_rank"),
    ("small_index_head", "index_head_dim"),
])
def test_convert_errors(case, message, tmp_path, capsys):
    _, src = _source(tmp_path, **({"q_lora_rank": None} if case == "no_q_lora" else {}))
    out = tmp_path / "out"
    extra = []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "no_config":
        (src / "config.json").unlink()
    elif case == "already":
        assert _convert(src, tmp_path / "first") == 0
        src = tmp_path / "first"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "small_index_head":
        extra = ["--index-head-dim", "4"]  # below the tiny preset's 8 rope dims
    capsys.readouterr()
    assert _convert(src, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek convert: error:") and message in err and "\n" not in err
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
