"""HF checkpoint interop: FP8 block-scaled weights, MTP layers, shards, tokenizer files, and bad input."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
import nanoseek.hf
from nanoseek.config import ConfigError, preset
from nanoseek.hf import CheckpointError


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    model = nanoseek.Transformer(preset("tiny", initializer_range=0.1)).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.2)
    path = nanoseek.save(model, tmp_path / "m")
    return model, path


def _ids(model, T=20):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


def test_round_trip_keeps_mtp_and_logits(tiny):
    model, path = tiny
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = model.config.num_hidden_layers
    for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
              "self_attn.kv_b_proj", "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj"):
        assert any(key.startswith(f"model.layers.{L}.{k}") for key in keys), k
    again = nanoseek.load(path)
    assert not again.training and len(again.mtp) == 1
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_sharded_checkpoint(tiny, tmp_path):
    model, _ = tiny
    path = nanoseek.save(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (path / "model.safetensors").exists()
    again = nanoseek.load(path)
    with torch.no_grad():
        assert torch.equal(model(_ids(model)), again(_ids(model)))


def _quantize_fp8(w: torch.Tensor, block=128):
    """Reference block quantisation, as DeepSeek's published FP8 weights are stored."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // block), -(-in_f // block)
    scale = torch.zeros(nb_o, nb_i)
    q = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
    for i in range(nb_o):
        for j in range(nb_i):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_scaled_checkpoint(tmp_path):
    """Linear weights stored as float8_e4m3fn + weight_scale_inv (partial edge blocks included)."""
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_size=160, q_lora_rank=136, initializer_range=0.1)  # 160 = one full + one partial block
    model = nanoseek.Transformer(cfg).eval()
    src = nanoseek.save(model, tmp_path / "bf", tokenizer_dir=None)
    tensors = load_file(str(src / "model.safetensors"))
    out, n_q = {}, 0
    for k, t in tensors.items():
        is_linear = t.ndim == 2 and "proj" in k and "embed" not in k and "head" not in k and "gate.weight" not in k
        if is_linear:
            q, s = _quantize_fp8(t)
            out[k], out[k + "_scale_inv"] = q, s
            n_q += 1
        else:
            out[k] = t.to(torch.bfloat16) if "gate." not in k else t
    assert n_q > 20
    dst = tmp_path / "fp8"
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg_json = json.loads((src / "config.json").read_text())
    cfg_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                       "activation_scheme": "dynamic"}
    cfg_json["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg_json))
    loaded = nanoseek.load(dst, dtype=torch.float32)
    # Every dequantised weight equals W_fp8 * scale_inv, block by block (edge blocks included).
    state = loaded.state_dict()
    w = loaded.layers[0].self_attn.q_a_proj.weight
    q, s = out["model.layers.0.self_attn.q_a_proj.weight"], out["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    assert torch.equal(w[:128, :128], q[:128, :128].float() * s[0, 0])
    assert torch.equal(w[128:, 128:], q[128:, 128:].float() * s[1, 1])
    ref_state = {}
    for name in state:
        hf_key = nanoseek.hf.ours_to_hf(name, cfg.num_hidden_layers)
        if hf_key in out and out[hf_key].dtype == torch.float8_e4m3fn:
            qq, ss = out[hf_key], out[hf_key + "_scale_inv"]
            ref_state[name] = qq.float() * ss.repeat_interleave(128, 0)[: qq.shape[0]].repeat_interleave(128, 1)[:, : qq.shape[1]]
    assert len(ref_state) > 10
    for name, t in ref_state.items():
        assert torch.equal(state[name], t), name
    ids = _ids(model)
    with torch.no_grad():
        ref, got = model(ids), loaded(ids)
    # Same function up to FP8 rounding: logits stay strongly correlated with the original model's.
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9
    assert loaded.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    bf16 = nanoseek.load(dst)  # dtype=None -> the checkpoint's compute dtype
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16 and bf16.layers[1].mlp.gate.weight.dtype == torch.float32


def test_tokenizer_files_travel(tiny, tmp_path):
    model, path = tiny
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    out = nanoseek.save(model, tmp_path / "with_tok", tokenizer_dir=tok)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = nanoseek.load(out)
    assert loaded.tokenizer_dir == str(out)
    again = nanoseek.save(loaded, tmp_path / "again")  # the model carries its tokenizer along
    assert (again / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'


def test_truncated_file_is_named(tiny, tmp_path):
    _, path = tiny
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.load(bad)


def _rewrite(path, dst, edit):
    shutil.copytree(path, dst)
    t = load_file(str(dst / "model.safetensors"))
    edit(t)
    save_file(t, str(dst / "model.safetensors"))


def test_wrong_shape_is_named(tiny, tmp_path):
    _, path = tiny
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(path, tmp_path / "b", lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match="kv_b_proj.*shape"):
        nanoseek.load(tmp_path / "b")


def test_missing_key_is_named(tiny, tmp_path):
    _, path = tiny
    _rewrite(path, tmp_path / "b", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.2\.mlp\.experts"):
        nanoseek.load(tmp_path / "b")


def test_unexpected_key_is_named(tiny, tmp_path):
    _, path = tiny
    _rewrite(path, tmp_path / "b", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        nanoseek.load(tmp_path / "b")


def test_invalid_config_is_named(tiny, tmp_path):
    _, path = tiny
    bad = tmp_path / "b"
    shutil.copytree(path, bad)
    d = json.loads((bad / "config.json").read_text())
    d["n_group"] = 3
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="divisible by n_group"):
        nanoseek.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        nanoseek.load(bad)
    with pytest.raises(CheckpointError, match="no such model directory"):
        nanoseek.load(tmp_path / "nope")


def test_missing_shard_is_named(tiny, tmp_path):
    model, _ = tiny
    path = nanoseek.save(model, tmp_path / "s", max_shard_bytes=200_000)
    (path / "model-00002-of-{:05d}.safetensors".format(
        len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())))).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.*missing"):
        nanoseek.load(path)


def test_tied_embeddings_with_a_stored_head(tmp_path):
    """Tied checkpoints may or may not store lm_head.weight; both load, the head being the embedding."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(preset("tiny", tie_word_embeddings=True)).eval()
    path = nanoseek.save(model, tmp_path / "tied")
    t = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in t
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(path / "model.safetensors"))
    again = nanoseek.load(path)
    assert again.lm_head.weight is again.embed_tokens.weight
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_v2_lite_style_round_trip(tmp_path):
    """Softmax gating, greedy top-k, no q_lora, no balancing bias on disk (the DeepSeek-V2-Lite layout)."""
    torch.manual_seed(0)
    cfg = preset("tiny", q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                 norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2, initializer_range=0.1)
    model = nanoseek.Transformer(cfg).eval()
    path = nanoseek.save(model, tmp_path / "v2")
    keys = load_file(str(path / "model.safetensors")).keys()
    assert not any("e_score_correction_bias" in k for k in keys) and any("self_attn.q_proj" in k for k in keys)
    again = nanoseek.load(path)
    assert again.config.scoring_func == "softmax" and again.config.topk_method == "greedy"
    with torch.no_grad():
        assert torch.equal(model(_ids(model)), again(_ids(model)))
