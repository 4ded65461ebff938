"""DeepSeek Sparse Attention (V3.2): logit parity with transformers.DeepseekV32ForCausalLM in fp32, both
directions, over sequences several times longer than index_topk; the absorbed (cached) math against the
naive path; the indexer's half-split rope; configs, checkpoints and accounting of deepseek_v32 models."""

from __future__ import annotations

import json

import pytest
import torch

import nanoseek
from nanoseek.accounting import (count_params, decode_attention_flops_per_token, indexer_cache_bytes_per_token,
                                 kv_cache_bytes_per_token, training_flops_per_token)
from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.hf import CheckpointError
from nanoseek.model import SparseMLA
from nanoseek.model.dsa import causal_bias
from nanoseek.model.layers import apply_rope
from test_parity import VARIANTS as V3_VARIANTS, _ids as _parity_ids, _randomize_bias, rel_err

transformers = pytest.importorskip("transformers")
# transformers added deepseek_v32 in 5.x (5.24 here); older installs skip the parity tests only.
needs_v32 = pytest.mark.skipif(not hasattr(transformers, "DeepseekV32ForCausalLM"),
                               reason=f"transformers {transformers.__version__} has no DeepseekV32ForCausalLM")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512,
            num_nextn_predict_layers=0, initializer_range=0.1, index_topk=24, index_n_heads=16, index_head_dim=16)
SEQ = 112  # > 4 x index_topk: most queries choose among many more keys than they keep

VARIANTS = {
    "group_routing": {},
    # the V3 parity suite's variants, now with indexers
    **{k: V3_VARIANTS[k] for k in ("plain_routing", "yarn_v3_style")},
    # mscale != mscale_all_dim scales cos/sin themselves: the indexer's rope must see that factor too
    "yarn_attention_factor": dict(rope_scaling={"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                                "mscale": 1.0, "mscale_all_dim": 0.707,
                                                "original_max_position_embeddings": 32}),
    "half_split_mla_rope": V3_VARIANTS["half_split_rope"],
    "several_dense_layers": V3_VARIANTS["several_dense_layers"],
    "mlp_layer_pattern": dict(num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "dense", "sparse"]),
    "wide_q_lora_rope_only_indexer": dict(q_lora_rank=48, index_head_dim=8),  # indexer dims all rotated
    "with_mtp": dict(num_nextn_predict_layers=1),
    "tied_embeddings": dict(tie_word_embeddings=True),
}


# Seeds of the test sequences whose top-k boundaries have no near-ties in both implementations (checked by
# _check_same_selection on every run; a change of initialisation may need another seed).
ID_SEED = {("to_hf", "plain_routing"): 1, ("from_hf", "group_routing"): 1, ("from_hf", "several_dense_layers"): 1,
           ("from_hf", "tied_embeddings"): 1, ("from_hf", "yarn_v3_style"): 1}


def _ids(vocab, B=2, T=SEQ, seed=0):
    return _parity_ids(vocab, B, T, seed)


def _randomize(model):
    """Non-trivial balancing biases and indexer LayerNorms (a zero bias would hide a missing one)."""
    _randomize_bias(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "indexer.k_norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))


def _causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def _our_selections(model, ids):
    """Per SparseMLA of the main layers: the [B, T, T] mask of the keys each query keeps, and the smallest
    relative gap between the k-th and (k+1)-th best score of a query that had to choose."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[:3])))
             for m in model.layers.modules() if isinstance(m, SparseMLA)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    T, causal = ids.shape[1], _causal(ids.shape[1])
    for mod, (x, cos, sin) in inputs:
        K = mod.indexer.topk
        with torch.no_grad():
            st = mod.project(x, cos, sin)
            scores = mod.indexer.scores(st.index_q, st.index_w, st.index_key).masked_fill(~causal, float("-inf"))
        top = scores.topk(K + 1, dim=-1)
        keep = torch.zeros_like(causal).expand_as(scores).scatter(-1, top.indices[..., :K], True) & causal
        choosing = top.values[:, K:, K]  # queries t >= K see t + 1 > K keys
        gap = (top.values[:, K:, K - 1] - choosing) / scores[:, K:].nan_to_num(0, 0, 0).abs().amax(-1)
        out.append((keep, gap.min().item()))
    return out


def _their_selections(hf, ids):
    found = []
    hooks = [m.register_forward_hook(lambda mod, args, kw, idx: found.append(idx), with_kwargs=True)
             for m in hf.modules() if type(m).__name__ == "DeepseekV32Indexer"]
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        for h in hooks:
            h.remove()
    causal = _causal(ids.shape[1])
    masks = [torch.zeros_like(causal).expand(ids.shape[0], -1, -1).scatter(-1, idx.long(), True) & causal
             for idx in found]
    return logits, masks


def _check_same_selection(model, hf, ids):
    """transformers and nanoseek keep the same tokens for every query of every layer, and no query's k-th
    and (k+1)-th best scores are within rounding of each other (so top-k tie-breaking cannot matter)."""
    ours = _our_selections(model, ids)
    logits, theirs = _their_selections(hf, ids)
    assert len(ours) == len(theirs) == model.config.num_hidden_layers
    for (keep, gap), their_keep in zip(ours, theirs):
        assert gap > 1e-5, f"a near-tie at the top-k boundary (relative gap {gap:.2e}): pick another seed"
        assert torch.equal(keep, their_keep)
    return logits


@needs_v32
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nanoseek_saved_loads_in_transformers(variant, tmp_path, one_thread):
    cfg = ModelConfig(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).eval()
    _randomize(model)
    nanoseek.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    ids = _ids(cfg.vocab_size, seed=ID_SEED.get(("to_hf", variant), 0))
    theirs = _check_same_selection(model, hf, ids)
    with torch.no_grad():
        ours = model(ids)
        assert rel_err(ours, theirs) < 1e-5, variant
        again = nanoseek.load(tmp_path)  # half-split MLA rope comes back as the equivalent interleaved layout
        assert again.config.is_dsa and again.config.rope_interleave
        assert rel_err(again(ids), ours) < 1e-6


@needs_v32
@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v not in ("half_split_mla_rope", "with_mtp")))
def test_transformers_saved_loads_in_nanoseek(variant, tmp_path, one_thread):
    """(transformers' deepseek_v32 has neither half-split MLA rope nor MTP layers: those go one way only.)"""
    cfg = ModelConfig(**{**BASE, **VARIANTS[variant]})
    hf_cfg = transformers.DeepseekV32Config(**{k: v for k, v in cfg.to_hf().items() if k != "rope_scaling"})
    torch.manual_seed(1)
    hf = transformers.DeepseekV32ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.3)
    hf.save_pretrained(tmp_path)
    model = nanoseek.load(tmp_path, dtype=torch.float32)
    assert model.config.is_dsa and model.config.is_moe_layer == cfg.is_moe_layer
    ids = _ids(cfg.vocab_size, seed=ID_SEED.get(("from_hf", variant), 0))
    theirs = _check_same_selection(model, hf, ids)
    with torch.no_grad():
        assert rel_err(model(ids), theirs) < 1e-5, variant


# ----------------------------------------------------------------------------- naive vs absorbed
def _layer(**overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    torch.manual_seed(3)
    model = nanoseek.Transformer(cfg).eval()
    _randomize(model)
    return model, model.layers[1].self_attn


@pytest.mark.parametrize("overrides", [{}, {"rope_interleave": False, "index_topk": 7}])
def test_absorbed_over_selected_latents_equals_naive(overrides, one_thread):
    """attend_cached (gather the K selected cache rows, attend in the latent space) is the naive path's
    masked attention: all queries at once, one token at a time, and rows at different positions."""
    model, attn = _layer(**overrides)
    B, T = 2, 80
    x = torch.randn(B, T, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(T))
    positions = torch.arange(T).expand(B, T)
    with torch.no_grad():
        naive = attn(x, cos, sin)
        st = attn.project(x, cos, sin)
        assert torch.equal(attn.attend_sequence(st), naive)  # what a cache's prefill calls with st's rows
        H = attn.n_heads
        assert causal_bias(positions[:, -1:], T, H) is None
        assert rel_err(attn.attend_cached(st, st.kv_row, st.index_key, positions, causal_bias(positions, T, H)),
                       naive) < 1e-5
        for t in (0, 5, attn.indexer.topk, T - 1):
            step = attn.project(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1])
            out = attn.attend_cached(step, st.kv_row[:, :t + 1], st.index_key[:, :t + 1], positions[:, t:t + 1],
                                     None)
            assert rel_err(out, naive[:, t:t + 1]) < 1e-5, t
        # ragged batch: row 1 decodes position 40 while row 0 decodes position 70, one cache of 71 rows; and
        # the same below index_topk, where attention covers the whole (masked) cache without the indexer
        for a, b in ((70, 40), (attn.indexer.topk - 1, 3)):
            pos = torch.tensor([[a], [b]])
            step = attn.project(x[[0, 1], [a, b]].unsqueeze(1), cos[pos], sin[pos])
            out = attn.attend_cached(step, st.kv_row[:, :a + 1], st.index_key[:, :a + 1], pos,
                                     causal_bias(pos, a + 1, H))
            assert rel_err(out[0], naive[0, a:a + 1]) < 1e-5 and rel_err(out[1], naive[1, b:b + 1]) < 1e-5


def test_sparse_equals_dense_when_everything_fits(one_thread):
    """index_topk >= the sequence: DSA selects every visible token, so a V3.2 model with the V3 weights
    computes exactly the V3 logits (and short sequences skip the indexer)."""
    dense_cfg = ModelConfig(**{k: v for k, v in BASE.items() if not k.startswith("index_")})
    torch.manual_seed(4)
    dense = nanoseek.Transformer(dense_cfg).eval()
    sparse = nanoseek.Transformer(dense_cfg.replace(index_topk=SEQ)).eval()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".indexer." in k for k in missing)
    with torch.no_grad():
        assert torch.equal(sparse(_ids(97)), dense(_ids(97)))
        short = sparse.layers[1].self_attn
        short.indexer.topk = 8  # now selection matters, and the logits move
        assert not torch.allclose(sparse(_ids(97)), dense(_ids(97)))


def test_indexer_rope_is_half_split_under_interleaved_mla(one_thread):
    """The indexer's key = k_norm(wk(h)) with its first R dims rotated as pairs (i, i + R/2), written out
    here with transformers' rotate_half formula, while MLA (rope_interleave) rotates pairs (2i, 2i + 1)."""
    model, attn = _layer()
    assert model.config.rope_interleave
    T, R = 10, model.config.qk_rope_head_dim
    x = torch.randn(1, T, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(T))
    with torch.no_grad():
        k = attn.indexer.k_norm(attn.indexer.wk(x))
        c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # transformers' [T, R] layout
        rot = k[..., :R]
        rotate_half = torch.cat([-rot[..., R // 2:], rot[..., : R // 2]], dim=-1)
        expect = torch.cat([rot * c + rotate_half * s, k[..., R:]], dim=-1)
        got = attn.indexer.keys(x, cos, sin)
        assert torch.allclose(got, expect, atol=1e-6)
        interleaved = torch.cat([apply_rope(rot.unsqueeze(2), cos, sin, True).squeeze(2), k[..., R:]], -1)
        assert not torch.allclose(got, interleaved, atol=1e-3)
        # the MLA rope key is the interleaved one
        _, _, _, k_rope = attn._project(x, cos, sin)
        raw = attn.kv_a_proj_with_mqa(x)[..., model.config.kv_lora_rank:]
        assert torch.allclose(k_rope, apply_rope(raw.unsqueeze(2), cos, sin, True).squeeze(2), atol=1e-6)


def test_training_step_reaches_mla_but_not_the_indexer(one_thread):
    """The LM loss trains MLA through the sparse mask; the top-k choice carries no gradient (the indexer
    learns from its own KL loss, DeepSeek-V3.2 section 2.1.1)."""
    model, _ = _layer()
    model.train()
    ids = _ids(97, T=64)
    model.forward_train(ids[:, :-1], ids[:, 1:]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.1.self_attn.kv_b_proj.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if ".indexer." in n)


# ----------------------------------------------------------------------------- configs and checkpoints
HUB_V32 = {  # the published DeepSeek-V3.2 config.json, shrunk (same keys and spellings)
    "architectures": ["DeepseekV32ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 64, "index_head_dim": 16, "index_n_heads": 8, "index_topk": 24, "initializer_range": 0.1,
    "intermediate_size": 96, "kv_lora_rank": 24, "max_position_embeddings": 512, "model_type": "deepseek_v32",
    "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 4, "n_routed_experts": 8, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 3, "num_hidden_layers": 3,
    "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "q_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 16, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 2, "topk_method": "noaux_tc", "torch_dtype": "float32", "transformers_version": "4.44.2",
    "use_cache": True, "v_head_dim": 12, "vocab_size": 97,
}


@needs_v32
def test_hub_style_v32_config(tmp_path, one_thread):
    cfg = ModelConfig.from_hf(HUB_V32)
    assert cfg.is_dsa and (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (24, 8, 16)
    assert cfg.rope_interleave and cfg.num_nextn_predict_layers == 1
    torch.manual_seed(2)
    model = nanoseek.Transformer(cfg).eval()
    _randomize(model)
    nanoseek.save(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_v32" and written["architectures"] == ["DeepseekV32ForCausalLM"]
    assert written["mlp_layer_types"] == ["dense", "sparse", "sparse"] and written["index_topk"] == 24
    (tmp_path / "config.json").write_text(json.dumps(HUB_V32))  # the hub file, not ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    again = nanoseek.load(tmp_path)
    assert len(again.mtp) == 1 and isinstance(again.mtp[0].self_attn, SparseMLA)  # V3.2's MTP layer has an indexer
    ids = _ids(97, seed=2)
    with torch.no_grad():
        ref = model(ids)
        assert rel_err(hf(ids).logits, ref) < 1e-5
        assert torch.equal(again(ids), ref)


def test_v32_config_round_trip_and_defaults():
    cfg = preset("small-dsa")
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg and back.model_type == "deepseek_v32"
    v3 = preset("small").to_hf()
    assert v3["model_type"] == "deepseek_v3" and "index_topk" not in v3 and "mlp_layer_types" not in v3
    # a deepseek_v32 file without the indexer fields gets transformers' defaults
    bare = {k: v for k, v in HUB_V32.items() if not k.startswith("index_")}
    assert (ModelConfig.from_hf(bare).index_topk, ModelConfig.from_hf(bare).index_n_heads) == (2048, 64)
    # mlp_layer_types: a dense-then-MoE list is first_k_dense_replace; any other pattern is kept
    assert ModelConfig(**{**BASE, "mlp_layer_types": ["dense", "dense", "sparse"]}).first_k_dense_replace == 2
    pattern = ModelConfig(**{**BASE, "mlp_layer_types": ["sparse", "dense", "sparse"]})
    assert pattern.is_moe_layer == [True, False, True] and pattern.to_hf()["mlp_layer_types"][1] == "dense"
    assert ModelConfig.from_hf(pattern.to_hf()) == pattern


@pytest.mark.parametrize("change, message", [
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(index_topk=0), "index_topk"),
    (dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
    (dict(index_topk=None, mlp_layer_types=["sparse", "dense", "sparse"]), "deepseek_v32"),
])
def test_bad_dsa_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **change})


@pytest.mark.parametrize("change, message", [
    (dict(model_type="deepseek_v3"), "deepseek_v32"),  # indexer fields in a V3 file
    (dict(mlp_layer_types=["dense", "dense", "sparse"]), "first_k_dense_replace"),
    (dict(indexer_rope_interleave=True), "half-split"),
])
def test_bad_v32_config_files(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**HUB_V32, **change})


def test_checkpoint_self_check_covers_the_indexer(tmp_path, one_thread):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(5)
    path = nanoseek.save(nanoseek.Transformer(ModelConfig(**BASE)), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.layers.2.self_attn.indexer.k_norm.bias"
    save_file({k: v for k, v in tensors.items() if k != key}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*indexer.k_norm.bias"):
        nanoseek.load(path)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    for k in ("index_topk", "index_n_heads", "index_head_dim", "mlp_layer_types"):
        cfg.pop(k)
    cfg["model_type"] = "deepseek_v3"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="V3.2 indexer weight"):
        nanoseek.load(path)


def test_fp8_indexer_weights_as_published(tmp_path, one_thread):
    """DeepSeek's V3.2 files: indexer wq_b and wk FP8 with a 128x128 weight_scale_inv, weights_proj BF16,
    k_norm FP32. Loading dequantises them; weights_proj stays fp32 in a bf16 model, as in transformers."""
    from safetensors.torch import load_file, save_file

    from nanoseek.train.fp8 import dequantize_blocks, quantize_blocks

    torch.manual_seed(6)
    cfg = ModelConfig(**{**BASE, "hidden_size": 160, "q_lora_rank": 136})  # one full and one partial block
    model = nanoseek.Transformer(cfg).eval()
    path = nanoseek.save(model, tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    expect = {}
    for k in list(tensors):
        if ".indexer.wq_b." in k or ".indexer.wk." in k:
            q, s = quantize_blocks(tensors[k])
            tensors[k], tensors[k[: -len("weight")] + "weight_scale_inv"] = q.contiguous(), s
            expect[k] = dequantize_blocks(q, s)
        elif ".indexer.weights_proj." in k:
            tensors[k] = tensors[k].to(torch.bfloat16)
            expect[k] = tensors[k].float()
    save_file(tensors, str(path / "model.safetensors"))
    loaded = nanoseek.load(path, dtype=torch.float32)
    state = loaded.state_dict()
    for k, v in expect.items():
        assert torch.equal(state[k.removeprefix("model.")], v), k
    bf16 = nanoseek.load(path, dtype=torch.bfloat16)
    assert bf16.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert bf16.layers[0].self_attn.indexer.wq_b.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- cached decoding
@pytest.fixture(scope="module")
def mtp_model():
    torch.manual_seed(5)
    model = nanoseek.Transformer(ModelConfig(**{**BASE, "num_nextn_predict_layers": 1})).eval()
    _randomize(model)
    return model


def test_cache_holds_the_indexer_keys(mtp_model):
    """cache_layout names the second stream; both caches allocate it for every layer, MTP included."""
    from nanoseek.infer.cache import PagedCache

    n_layers, widths = mtp_model.cache_layout()
    assert (n_layers, widths) == (4, {"latent": 24 + 8, "index_key": 16})
    assert {k: tuple(v.shape) for k, v in mtp_model.new_cache(2, 40).data.items()} == {
        "latent": (4, 2, 40, 32), "index_key": (4, 2, 40, 16)}
    paged = PagedCache.for_model(mtp_model, 10, 8, torch.float32, "cpu")  # 10 blocks of 8 (+ the sink block)
    assert {k: tuple(v.shape) for k, v in paged.data.items()} == {"latent": (4, 11, 8, 32), "index_key": (4, 11, 8, 16)}
    dense = nanoseek.Transformer(ModelConfig(**{k: v for k, v in BASE.items() if not k.startswith("index_")}))
    assert dense.cache_layout()[1] == {"latent": 32}


@pytest.mark.parametrize("cache_kind", ["reference", "engine"])
def test_cached_decoding_equals_full_forward(mtp_model, cache_kind, one_thread, paged_rows):
    """A prefill longer than index_topk (selection inside it), then one token at a time with rows at
    different positions, then a two-token verify step: the logits of one full forward, and the MTP head's."""
    model, T = mtp_model, 72
    ids = _ids(model.config.vocab_size, B=2, T=T, seed=2)
    with torch.no_grad():
        full_h, _ = model.hidden_states(ids)
        full = model.lm_head(model.norm(full_h))
        (_, mod, mtp_h, _), = model.mtp_hidden_states(full_h, ids)
        mtp_full = model.lm_head(mod.shared_head.norm(mtp_h))
        if cache_kind == "reference":
            view = model.new_cache(3, T).view
        else:  # the engine's paged cache, blocks of 4 in a scrambled order
            _, view = paged_rows(model, 3, T)
        slots = torch.tensor([2, 0])
        P = 30  # > index_topk (24)
        pre, h = model.forward_cached(ids[:, :P], view(slots, torch.zeros(2, dtype=torch.long), P))
        torch.testing.assert_close(pre, full[:, :P], atol=1e-5, rtol=1e-5)
        zeros = torch.zeros(2, dtype=torch.long)
        mtp_pre, _ = model.mtp_forward_cached(h[:, :P - 1], ids[:, 1:P], view(slots, zeros, P - 1))
        torch.testing.assert_close(mtp_pre, mtp_full[:, :P - 1], atol=1e-5, rtol=1e-5)
        # row 0 runs ahead to 60 alone, then both rows step together at different positions
        for t in range(P, 60):
            step, _ = model.forward_cached(ids[:1, t:t + 1], view(slots[:1], torch.tensor([t]), 1))
            torch.testing.assert_close(step[0, 0], full[0, t], atol=1e-5, rtol=1e-5)
        for i in range(8):
            pos = torch.tensor([60 + i, P + i])
            step, h = model.forward_cached(ids[[0, 1], pos].unsqueeze(1), view(slots, pos, 1))
            for b in range(2):
                torch.testing.assert_close(step[b, 0], full[b, int(pos[b])], atol=1e-5, rtol=1e-5)
        # a speculative verify step (two tokens per row), rolled back by one and repeated
        for _ in range(2):
            pos = torch.tensor([68, P + 8])
            two = torch.stack([ids[0, 68:70], ids[1, P + 8:P + 10]])
            step, _ = model.forward_cached(two, view(slots, pos, 2))
            for b in range(2):
                p = int(pos[b])
                torch.testing.assert_close(step[b], full[b, p:p + 2], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- accounting
def test_params_command_shows_the_indexer(capsys):
    from nanoseek.cli import main

    assert main(["params", "--preset", "deepseek-v3.2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["indexer_params"] == 61 * 13_959_424 and d["total_params"] == 671_877_944_064
    assert (d["latent_cache_bytes_per_token"], d["indexer_cache_bytes_per_token"]) == (70_272, 15_616)
    assert main(["params", "--preset", "small-dsa"]) == 0
    table = capsys.readouterr().out
    assert "V3.2 indexers" in table and "indexer keys" in table and "top-32" in table


def test_deepseek_v32_accounting():
    v3, v32 = preset("deepseek-v3"), preset("deepseek-v3.2")
    per_layer = 64 * 128 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168  # wq_b, wk, k_norm, weights_proj
    assert per_layer == 13_959_424
    a, b = count_params(v3), count_params(v32)
    assert b.indexer_params == 61 * per_layer and b.total_params == a.total_params + 61 * per_layer
    assert b.active_params == a.active_params + 61 * per_layer
    assert b.mtp_params == a.mtp_params + per_layer  # the MTP block has an indexer too
    assert b.attention_params == a.attention_params + b.indexer_params
    assert kv_cache_bytes_per_token(v3) == 70_272 and indexer_cache_bytes_per_token(v3) == 0
    assert indexer_cache_bytes_per_token(v32) == 61 * 128 * 2
    assert kv_cache_bytes_per_token(v32) == 70_272 + 15_616
    # decode: the indexer is O(L) with 64 x 129 per key, the main attention stops growing at 2048 keys
    at = {L: decode_attention_flops_per_token(v32, L) for L in (1024, 2048, 32768)}
    dense = {L: decode_attention_flops_per_token(v3, L) for L in at}
    assert at[1024] > dense[1024]  # below index_topk DSA only adds the indexer
    assert dense[32768] / at[32768] > 8  # (2 * 128 * 1088) / (2 * 64 * 129 + 2 * 128 * 1088 * 2048 / 32768)
    per_key_index = 61 * 2 * 64 * 129
    assert at[32768] - at[2048] == pytest.approx(per_key_index * (32768 - 2048))
    # training at 128K: the main attention sees ~2048 keys instead of 64K
    assert training_flops_per_token(v32, 131072) < 0.5 * training_flops_per_token(v3, 131072)
    assert training_flops_per_token(v32, 1024) > training_flops_per_token(v3, 1024)


# ----------------------------------------------------------------------------- engine, generate, serve
def _greedy_full_forward(model, prompt, n):
    """Greedy tokens by one uncached full forward over the whole sequence per step."""
    from test_engine import greedy_reference

    return greedy_reference(model, prompt, n)


def test_engine_generate_and_speculation_on_v32(mtp_model, one_thread):
    """The engine (continuous batching, rows at different positions) and nanoseek.generate give the greedy
    tokens of the uncached full forward on a V3.2 model, with prompts and outputs either side of index_topk;
    MTP speculative decoding gives the same tokens and drafts for real."""
    from nanoseek.infer import Engine, SamplingParams, generate

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, mtp_model.config.vocab_size, (n,), generator=g).tolist() for n in (31, 6, 17)]
    n_new = 22  # the 6-token prompt crosses index_topk (24) while decoding; the 31-token one starts past it
    want = [_greedy_full_forward(mtp_model, p, n_new) for p in prompts]
    engine = Engine(mtp_model, max_batch_size=2, max_len=64)  # 3 requests, 2 slots: one joins mid-batch
    got = engine.generate_batch(prompts, SamplingParams(max_tokens=n_new))
    assert [c.token_ids for c in got] == want
    assert generate(mtp_model, prompts, n_new) == want
    spec_engine = Engine(mtp_model, max_batch_size=3, max_len=64, speculative=True)
    spec = spec_engine.generate_batch(prompts, SamplingParams(max_tokens=n_new))
    assert [c.token_ids for c in spec] == want
    assert spec_engine.stats.drafted > 0
