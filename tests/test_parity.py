"""Logits parity with transformers.DeepseekV3ForCausalLM, fp32, in both directions, on tiny random configs."""

import json

import pytest
import torch

import nanoseek
from conftest import require_module
from nanoseek.config import preset

transformers = require_module("transformers", "pip install 'transformers>=5,<6' (in the [dev] extra)")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512,
            num_nextn_predict_layers=0, initializer_range=0.1)

VARIANTS = {
    "v3_group_routing": {},
    "no_q_lora": dict(q_lora_rank=None),
    "plain_routing": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2),
    "yarn_mscale_all_dim": dict(rope_scaling={"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                              "mscale": 0.707, "mscale_all_dim": 0.707,
                                              "original_max_position_embeddings": 32}),
    "yarn_v3_style": dict(rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                        "mscale": 1.0, "mscale_all_dim": 1.0,
                                        "original_max_position_embeddings": 16}),
    "half_split_rope": dict(rope_interleave=False),
    "several_dense_layers": dict(num_hidden_layers=4, first_k_dense_replace=2),
    "with_mtp": dict(num_nextn_predict_layers=1),
    "tied_embeddings": dict(tie_word_embeddings=True),
}
SEQ = 160  # long enough that a wrong softmax scale or YaRN ramp shows in the logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(vocab, B=2, T=SEQ, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize_bias(model):
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.gate.e_score_correction_bias.shape) * 0.3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nanoseek_saved_loads_in_transformers(variant, tmp_path):
    cfg = nanoseek.ModelConfig(**{**BASE, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).eval()
    _randomize_bias(model)
    nanoseek.save(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert rel_err(ours, theirs) < 1e-5, variant


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_saved_loads_in_nanoseek(variant, tmp_path):
    cfg = nanoseek.ModelConfig(**{**BASE, **VARIANTS[variant]})
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf().items() if k != "rope_scaling"})
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norm weights catch a misplaced norm
        for layer in hf.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.3)
    hf.save_pretrained(tmp_path)
    model = nanoseek.load(tmp_path, dtype=torch.float32)
    ids = _ids(cfg.vocab_size, seed=1)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5, variant


def test_hub_style_config(tmp_path):
    """A config.json written the way the published DeepSeek-V3 repository writes it."""
    hub = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 97,
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "num_nextn_predict_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
        "n_routed_experts": 8, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 24, "q_lora_rank": 32,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 16, "topk_method": "noaux_tc", "n_group": 4,
        "topk_group": 2, "num_experts_per_tok": 3, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 512, "initializer_range": 0.1, "rms_norm_eps": 1e-6,
        "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
        "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 16, "type": "yarn"},
    }
    cfg = nanoseek.ModelConfig.from_hf(hub)
    assert cfg.rope_scaling["factor"] == 40 and cfg.num_nextn_predict_layers == 1 and cfg.scoring_func == "sigmoid"
    torch.manual_seed(2)
    model = nanoseek.Transformer(cfg).eval()
    _randomize_bias(model)
    nanoseek.save(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hub))  # the hub file, not ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    again = nanoseek.load(tmp_path)
    assert len(again.mtp) == 1
    ids = _ids(97, seed=2)
    with torch.no_grad():
        ref = model(ids)
        assert rel_err(hf(ids).logits, ref) < 1e-5
        assert torch.equal(again(ids), ref)


def test_exported_config_names_the_routing():
    """Consumers that miss scoring_func assume softmax gating (llama.cpp's converter does): we always write it."""
    d = preset("deepseek-v3").to_hf()
    assert d["scoring_func"] == "sigmoid" and d["topk_method"] == "noaux_tc"
    assert d["rope_scaling"]["type"] == "yarn" and d["rope_theta"] == 10000.0
    assert d["rope_parameters"]["rope_type"] == "yarn" and d["num_key_value_heads"] == 128
