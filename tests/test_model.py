"""Model internals: router rules, absorbed vs naive MLA, cached decoding, MTP, balance loss."""

import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import Transformer
from nanoseek.model.moe import GroupedExperts, Router

# Tiny tensors: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def router(**kw):
    cfg = preset("tiny", **{"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, **kw})
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


def test_bias_steers_selection_but_never_the_weights():
    r = router(norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    x = torch.randn(16, r.weight.shape[1])
    w0, idx0, scores = r(x)
    assert torch.allclose(w0, scores.gather(1, idx0))
    r.e_score_correction_bias[3] = 100.0  # expert 3 is now always chosen
    w1, idx1, scores1 = r(x)
    assert (idx1 == 3).any(dim=1).all()
    # The gate value of expert 3 is its raw sigmoid score, not score + bias.
    w3 = w1[idx1 == 3]
    assert torch.allclose(w3, scores1[:, 3]) and (w3 <= 1).all()


def test_weights_normalised_then_scaled():
    r = router(norm_topk_prob=True, routed_scaling_factor=2.5)
    w, _, _ = r(torch.randn(10, r.weight.shape[1]))
    assert torch.allclose(w.sum(-1), torch.full((10,), 2.5))


def test_masked_groups_never_chosen_even_with_negative_scores():
    """With a bias making every biased score negative, a masked group must still lose (-inf, not 0)."""
    r = router(n_group=4, topk_group=1, num_experts_per_tok=2)
    r.e_score_correction_bias.fill_(-5.0)
    r.e_score_correction_bias[4:6] = -3.0  # group 2 is the best group for every token
    _, idx, _ = r(torch.randn(32, r.weight.shape[1]))
    assert ((idx >= 4) & (idx < 6)).all()


def test_group_limited_greedy_and_softmax():
    r = router(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(20, r.weight.shape[1])
    w, idx, scores = r(x)
    assert torch.allclose(scores.sum(-1), torch.ones(20))
    best_group = scores.view(20, 4, 2).amax(-1).argmax(-1)
    assert ((idx // 2) == best_group[:, None]).all()  # both experts from the single allowed group
    assert torch.allclose(w, scores.gather(1, idx))


def test_config_validation_errors_name_the_problem():
    with pytest.raises(ConfigError, match="n_routed_experts % n_group"):
        preset("tiny", n_routed_experts=6, n_group=4)
    with pytest.raises(ConfigError, match="topk_group > n_group"):
        preset("tiny", topk_group=3, n_group=2)
    with pytest.raises(ConfigError, match="qk_rope_head_dim must be even"):
        preset("tiny", qk_rope_head_dim=7)
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig.from_hf({"scoring_func": "relu"})
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        ModelConfig.from_hf({"moe_layer_freq": 2})
    with pytest.raises(ConfigError, match="rope type"):
        ModelConfig.from_hf({"rope_scaling": {"type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_interleave": False},
                                       {"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                                         "mscale_all_dim": 1.0,
                                                         "original_max_position_embeddings": 16}}])
def test_absorbed_equals_naive(overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.2, **overrides)
    attn = Transformer(cfg).layers[0].self_attn.eval()
    x = torch.randn(2, 24, cfg.hidden_size)
    cos, sin = Transformer(cfg).rotary(torch.arange(24))
    with torch.no_grad():
        q_nope, q_rope, latent, k_rope = attn._project(x, cos, sin)
        naive = attn._naive(q_nope, q_rope, latent, k_rope)
        # The absorbed path takes the cache rows [latent | rope key] and an additive causal mask laid out
        # (token, head) per row.
        causal = torch.zeros(24, 24).masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
        bias = causal[:, None, :].expand(24, cfg.num_attention_heads, 24).reshape(1, -1, 24).expand(2, -1, -1)
        absorbed = attn._absorbed(q_nope, q_rope, torch.cat([latent, k_rope], -1), bias)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-6)


def test_cached_decoding_equals_full_forward_with_mixed_positions():
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(5, max_len=64)
        slots = torch.tensor([4, 0, 2])
        # Rows prefill different lengths (right padding is harmless), then decode one token at a time.
        lens = [12, 7, 1]
        zeros = torch.zeros(3, dtype=torch.long)
        logits, _ = model.forward_cached(ids[:, :12], cache.view(slots, zeros, 12))
        for b, n in enumerate(lens):
            torch.testing.assert_close(logits[b, :n], full[b, :n], rtol=1e-4, atol=1e-5)
        # Logits at one position per row only (how the engine prefills).
        last, _ = model.forward_cached(ids[:, :12], cache.view(slots, zeros, 12), logits_at=torch.tensor(lens) - 1)
        torch.testing.assert_close(last[:, 0], full[[0, 1, 2], [11, 6, 0]], rtol=1e-4, atol=1e-5)
        pos = torch.tensor(lens)
        while int(pos.min()) < 30:
            step_ids = ids.gather(1, pos.clamp(max=29)[:, None])
            logits, _ = model.forward_cached(step_ids, cache.view(slots, pos, 1))
            for b in range(3):
                if pos[b] < 30:
                    torch.testing.assert_close(logits[b, 0], full[b, pos[b]], rtol=1e-4, atol=1e-5)
            pos = pos + 1
        # A two-token verify step (speculative decoding) at a rolled-back position.
        logits, _ = model.forward_cached(ids[:, 20:22], cache.view(slots, torch.full((3,), 20), 2))
        torch.testing.assert_close(logits, full[:, 20:22], rtol=1e-4, atol=1e-5)


def test_cache_view_interface():
    """What the model reads from a cache view: positions, the prefill flag, the causal mask and its score bias."""
    model = Transformer(preset("tiny")).eval()
    cfg = model.config
    W = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert model.cache_layout() == (cfg.num_hidden_layers + cfg.num_nextn_predict_layers, {"latent": W})
    cache = model.new_cache(3, 8)
    view = cache.view(torch.tensor([2, 0]), torch.tensor([3, 1]), 2)
    assert view.positions.tolist() == [[3, 4], [1, 2]] and view.kv_len == 5 and not view.prefill
    assert view.mask().tolist() == [[[j <= p for j in range(5)] for p in row] for row in ([3, 4], [1, 2])]
    bias = view.score_bias(n_heads=4)
    assert bias.shape == (2, 2 * 4, 5) and (bias[1, 4:] == torch.tensor([0, 0, 0, float("-inf"), float("-inf")])).all()
    assert cache.view(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), 3).prefill
    assert cache.view(torch.tensor([0, 1]), torch.tensor([4, 4]), 1).score_bias(4) is None  # nothing to mask
    rows = torch.randn(2, 2, W)
    view.write(0, "latent", rows)
    torch.testing.assert_close(view.read(0, "latent")[0, 3:5], rows[0])
    torch.testing.assert_close(cache.data["latent"][0, 0, 1:3], rows[1])


def test_cache_bounds_are_checked():
    model = Transformer(preset("tiny")).eval()
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.view(torch.tensor([0]), torch.tensor([6]), 4)
    with pytest.raises(ValueError, match="slot out of range"):
        cache.view(torch.tensor([2]), torch.tensor([0]), 1)


def test_mtp_cached_equals_training_path():
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        h, _ = model.hidden_states(ids)
        (_, mod, h1, _), = list(model.mtp_hidden_states(h, ids))
        ref = model.lm_head(mod.shared_head.norm(h1))  # [B, 15, V]: position i predicts token i+2
        cache = model.new_cache(2, 32)
        slots, start = torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long)
        _, hidden = model.forward_cached(ids, cache.view(slots, start, 16))
        mtp_logits, _ = model.mtp_forward_cached(hidden[:, :15], ids[:, 1:], cache.view(slots, start, 15))
    torch.testing.assert_close(mtp_logits, ref, rtol=1e-4, atol=1e-5)


def test_train_losses_and_load_accounting():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    out = model.forward_train(ids, targets, mtp_weight=0.3, aux_alpha=1e-3)
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.aux_loss)
    # Random init: loss near ln(V); aux loss near alpha * n_moe_layers (balanced routing gives ~1 per layer).
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5
    n_moe = len(model.moe_layers())
    assert 0.5 * 1e-3 * n_moe < out.aux_loss.item() < 3 * 1e-3 * n_moe
    out.loss.backward()
    # Every parameter gets a gradient, the router's weight included (through the gate values). Routed
    # experts that no token chose get exactly zero, every other parameter a non-zero one.
    experts = {id(p) for m in model.moe_layers() for p in m.experts.parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None and (id(p) in experts or p.grad.abs().sum() > 0), name
    for m in model.moe_layers():
        for p in m.experts.parameters():
            assert (p.grad.flatten(1).abs().sum(1) > 0).tolist() == (m.load > 0).tolist()
    # Every token picks K experts in every MoE layer (MTP layer sees T-1 positions).
    loads = [m.load.sum().item() for m in model.moe_layers()]
    K = cfg.num_experts_per_tok
    assert loads == [32 * K] * (n_moe - 1) + [30 * K]
    model.reset_load()
    assert all(m.load.sum() == 0 for m in model.moe_layers())


def test_grouped_experts_paths_agree():
    """grouped_mm and the padded batched GEMM, each forced, compute the same function; so does grouped_mm
    under bf16 autocast (to bf16 precision)."""
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_size=64, moe_intermediate_size=32)
    experts = Transformer(cfg).layers[1].mlp.experts
    counts = torch.tensor([5, 0, 9, 1, 3, 0, 2, 4])
    x = torch.randn(int(counts.sum()), 64)
    assert type(experts) is GroupedExperts and experts.use_grouped_mm(x, counts)  # 64 / 32: aligned
    grouped = experts.forward_grouped(x, counts)
    padded = experts.forward_sorted_padded(x, counts, int(counts.max()))
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)
    # ... and both equal each expert applied to its own rows, one at a time.
    w1, w2 = experts.gate_up_proj, experts.down_proj
    rows = list(x.split(counts.tolist()))
    ref = torch.cat([torch.nn.functional.silu(r @ w1[e, :32].t()) * (r @ w1[e, 32:].t()) @ w2[e].t()
                     for e, r in enumerate(rows)])
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts(x, counts), grouped)  # forward picks grouped_mm here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, counts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-3)
    # Unaligned strides fall back to the padded GEMM.
    odd = Transformer(preset("tiny", hidden_size=60, moe_intermediate_size=30)).layers[1].mlp.experts
    assert not odd.use_grouped_mm(torch.randn(24, 60), counts)
    # The padded buffer may have more rows per expert than the most any expert got (off the CPU a decode
    # batch's is sized from shapes: tests/test_device_guard.py); on the CPU it reads the counts.
    assert experts.capacity(counts, 10) == 9
    torch.testing.assert_close(experts.forward_sorted_padded(x, counts, 24), padded)


def test_cache_reads_non_contiguous_slots():
    """Rows whose slots are not one contiguous range are gathered; the logits equal those of each row alone."""
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(4, max_len=16)
        slots = torch.tensor([3, 1])
        model.forward_cached(ids[:, :9], cache.view(slots, torch.zeros(2, dtype=torch.long), 9))
        step, _ = model.forward_cached(ids[:, 9:], cache.view(slots, torch.full((2,), 9), 1))
    torch.testing.assert_close(step[:, 0], full[:, 9], rtol=1e-4, atol=1e-5)


def test_experts_with_no_tokens():
    """An expert-parallel rank can receive no tokens at all; the result is empty and backward still works."""
    experts = Transformer(preset("tiny")).layers[1].mlp.experts
    for autocast in (False, True):
        x = torch.zeros(0, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = experts(x, torch.zeros(8, dtype=torch.long))
        assert y.shape == (0, 64)
        y.float().sum().backward()
        # The input gets a (empty) gradient: under expert parallelism the all-to-all backward must run.
        assert x.grad is not None and x.grad.shape == (0, 64)


def test_model_package_is_the_mathematics_only():
    """model/ imports only torch and nanoseek.config, knows nothing of kernels, FP8, EP or FSDP, and stays
    about 1,000 lines (the CPU decode paths live in nanoseek.infer.fast, parallelism in nanoseek.train)."""
    import ast
    from pathlib import Path

    import nanoseek.model

    root = Path(nanoseek.model.__file__).parent
    lines = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        lines += len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ("torch", "__future__", "math", "dataclasses") or \
                    name in (".", "..config") or (name.startswith(".") and name.count(".") == 1), (path.name, name)
        for word in ("kernels.", "csrc", "fp8", "dispatcher", "fsdp", "forward_decode"):
            assert word not in text.lower(), (path.name, word)
    assert lines <= 1100, lines
