"""Model internals: router rules, absorbed vs naive MLA, cached decoding, MTP, balance loss."""

import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import Transformer
from nanoseek.model.attention import CacheView
from nanoseek.model.moe import Router


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
        naive = attn._naive(q_nope, q_rope, latent, k_rope, mask=None)
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
        cache = model.new_cache(num_slots=5, max_len=64)
        slots = torch.tensor([4, 0, 2])
        # Rows prefill different lengths (right padding is harmless), then decode one token at a time.
        lens = [12, 7, 1]
        logits, _ = model.forward_cached(ids[:, :12], torch.zeros(3, dtype=torch.long), slots, cache)
        for b, n in enumerate(lens):
            torch.testing.assert_close(logits[b, :n], full[b, :n], rtol=1e-4, atol=1e-5)
        # Logits at one position per row only (how the engine prefills).
        last, _ = model.forward_cached(ids[:, :12], torch.zeros(3, dtype=torch.long), slots, cache,
                                       logits_at=torch.tensor(lens) - 1)
        torch.testing.assert_close(last[:, 0], full[[0, 1, 2], [11, 6, 0]], rtol=1e-4, atol=1e-5)
        pos = torch.tensor(lens)
        while int(pos.min()) < 30:
            step_ids = ids.gather(1, pos.clamp(max=29)[:, None])
            logits, _ = model.forward_cached(step_ids, pos, slots, cache)
            for b in range(3):
                if pos[b] < 30:
                    torch.testing.assert_close(logits[b, 0], full[b, pos[b]], rtol=1e-4, atol=1e-5)
            pos = pos + 1
        # A two-token verify step (speculative decoding) at a rolled-back position.
        logits, _ = model.forward_cached(ids[:, 20:22], torch.full((3,), 20), slots, cache)
        torch.testing.assert_close(logits, full[:, 20:22], rtol=1e-4, atol=1e-5)


def test_cache_bounds_are_checked():
    model = Transformer(preset("tiny")).eval()
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        CacheView(cache, torch.tensor([0]), torch.tensor([6]), 4)
    with pytest.raises(ValueError, match="slot out of range"):
        CacheView(cache, torch.tensor([2]), torch.tensor([0]), 1)


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
        _, hidden = model.forward_cached(ids, start, slots, cache)
        mtp_logits, _ = model.mtp_forward_cached(hidden[:, :15], ids[:, 1:], start, slots, cache)
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
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate.weight" not in n or True)
    # Every token picks K experts in every MoE layer (MTP layer sees T-1 positions).
    loads = [m.load.sum().item() for m in model.moe_layers()]
    K = cfg.num_experts_per_tok
    assert loads == [32 * K] * (n_moe - 1) + [30 * K]
    model.reset_load()
    assert all(m.load.sum() == 0 for m in model.moe_layers())


def test_grouped_experts_paths_agree():
    """The padded-bmm path (fp32) and grouped_mm path (bf16) compute the same function."""
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_size=64, moe_intermediate_size=32)
    experts = Transformer(cfg).layers[1].mlp.experts
    counts = torch.tensor([5, 0, 9, 1, 3, 0, 2, 4])
    x = torch.randn(int(counts.sum()), 64)
    ref = experts(x, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, counts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-3)


def test_few_token_moe_path_equals_batched():
    """Decoding runs only the chosen experts (GroupedExperts.forward_few); it must equal the all-experts path."""
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.2)
    moe = Transformer(cfg).layers[1].mlp.eval()
    T = moe.FEW_ASSIGNMENTS // cfg.num_experts_per_tok + 8  # enough tokens for the batched path
    x = torch.randn(1, T, cfg.hidden_size)
    from nanoseek.model import kernels

    with torch.no_grad(), kernels.disabled():  # the torch paths (test_kernels.py covers the C++ one)
        batched, _ = moe(x)
        for n in (1, 2, 3):  # one token (plain decoding), two (a speculative verify), three
            few = torch.cat([moe(x[:, t:t + n])[0] for t in range(0, T - n + 1, n)], dim=1)
            torch.testing.assert_close(few, batched[:, : few.shape[1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_inference_linear_layouts_equal_f_linear(threads, use_kernels):
    """layers.linear picks a kernel or GEMM layout for a few rows at inference; the values must be F.linear's."""
    import contextlib

    from nanoseek.model import kernels
    from nanoseek.model.layers import linear

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    with contextlib.nullcontext() if use_kernels else kernels.disabled():
        torch.manual_seed(0)
        w = torch.randn(384, 256)
        for rows in (1, 2, 5, 64, 65, 200):
            x = torch.randn(rows, 256)
            with torch.no_grad():
                for xin in (x, x[:, None, :], x.view(1, rows, 256)):
                    got = linear(xin, w)
                    assert got.shape == xin.shape[:-1] + (384,) and got.is_contiguous()
                    torch.testing.assert_close(got, torch.nn.functional.linear(xin, w), rtol=1e-5, atol=1e-5)
                # A strided weight (a slice of stacked experts, transposed) still gives the same result.
                torch.testing.assert_close(linear(x, w.t().contiguous().t()), x @ w.t(), rtol=1e-5, atol=1e-5)
        x = torch.randn(2, 256, requires_grad=True)
        linear(x, w).sum().backward()  # training keeps F.linear and its autograd
        torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)
    torch.set_num_threads(old)


def test_cache_reads_non_contiguous_slots():
    """Rows whose slots are not one contiguous range are gathered; the logits equal those of each row alone."""
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(num_slots=4, max_len=16)
        slots = torch.tensor([3, 1])
        model.forward_cached(ids[:, :9], torch.zeros(2, dtype=torch.long), slots, cache)
        step, _ = model.forward_cached(ids[:, 9:], torch.full((2,), 9), slots, cache)
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
