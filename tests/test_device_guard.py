"""A CPU-side guard for device bugs: whatever is not data-dependent runs on PyTorch's `meta` device.

A CPU tensor mixed into a meta computation raises ("Tensor on device cpu is not on the expected device
meta!"), exactly where a CUDA run would fail on a tensor made on the CPU; indexing, sort, softmax and
multinomial all run on meta. So each piece of code that builds tensors of its own (the sampler, the losses,
the router, attention in both paths, the FP8 quantisers and GEMM layouts, the tensor part of an engine step)
runs here on meta inputs, and every result must come back on meta. A meta tensor has no values either, so a
read back to the host (`.tolist()`, `int(t)`, a data-dependent shape) raises: a whole decode-step forward
on a paged cache view runs here too, which proves that the model path a GPU decodes with reads nothing back
per token. What must read values (the sampled ids, the engine's bookkeeping) cannot run on meta:
tests/test_gpu.py covers it on a GPU.
Autocast has no meta backend (torch.autocast("meta") raises), so here it reads as "off" on meta.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import preset
from nanoseek.infer.engine import Request, speculative_tensors, token_logprobs
from nanoseek.infer.sampling import SamplingParams, draw, probs, sample, verify_drafts
from nanoseek.model import Transformer
from nanoseek.model.attention import MLA
from nanoseek.model.moe import GroupedExperts, MoE, Router
from nanoseek.rl import grpo
from nanoseek.train import fp8_gemm
from nanoseek.train.fp8 import FP8Options, enable_fp8, fp8_bmm, fp8_linear, quantize_blocks, quantize_tiles

META = torch.device("meta")
V = 97

# One row of each kind: greedy, temperature only, top-k, top-p, both, seeded, with logprobs.
PARAMS = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
          SamplingParams(temperature=1.2, top_p=0.9), SamplingParams(temperature=0.8, top_k=20, top_p=0.5, seed=3),
          SamplingParams(temperature=1.0, seed=11, logprobs=True), SamplingParams(logprobs=True)]


@pytest.fixture(autouse=True)
def meta_has_autocast_off(monkeypatch):
    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: contextlib.nullcontext()
                        if device_type == "meta" else autocast(device_type, *a, **k))
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == "meta" else enabled(*a))


def on_meta(*tensors):
    for t in tensors:
        assert t.device == META, t.device
    return True


def test_cpu_tensor_in_meta_math_raises():
    """The probe itself: this is the error every test below would hit on a device bug."""
    with pytest.raises(RuntimeError, match="expected device meta"):
        torch.randn(3, 4, device=META) * torch.randn(3, 4)


@pytest.mark.parametrize("rows", [[0], [1], [2, 3], list(range(len(PARAMS)))])
def test_sampling_every_kind_of_parameter(rows):
    params = [PARAMS[i] for i in rows]
    gens = [p.make_generator() for p in params]
    logits = torch.randn(len(rows), V, device=META)
    p = probs(logits, params)
    toks = sample(logits, params, gens)
    assert on_meta(p, toks, draw(p, gens, params), token_logprobs(logits, toks))
    assert toks.shape == (len(rows),) and toks.dtype == torch.long


def test_speculative_verification_and_engine_step_tensors():
    params = PARAMS
    gens = [p.make_generator() for p in params]
    logits = torch.randn(len(params), 2, V, device=META)
    q = probs(torch.randn(len(params), V, device=META), params)
    drafts = torch.randint(0, V, (len(params),), device=META)
    p0, p1 = probs(logits[:, 0], params), probs(logits[:, 1], params)
    accepted, token = verify_drafts(p0, p1, q, drafts, params, gens)
    assert on_meta(accepted, token) and accepted.dtype == torch.bool
    reqs = []
    for i, sp in enumerate(params):
        r = Request(i, [1, 2, 3], sp)
        r.generator, r.draft, r.draft_q = gens[i], 5 + i, None if sp.greedy else q[i]
        reqs.append(r)
    for batch in (reqs, [r for r in reqs if r.params.greedy]):
        accepted, token, lp, _ = speculative_tensors(logits[: len(batch)], batch)
        assert on_meta(accepted, token) and (lp is None or on_meta(lp) and lp.shape == (len(batch), 2))


def _meta_model(**over):
    with META:
        return Transformer(preset("tiny", **over))


def test_lm_and_mtp_losses_and_backward():
    """The training forward (MLA naive path, rotary, norms, MLPs, head, LM + MTP cross-entropy) and backward;
    dense layers, because routing to experts reads the expert counts."""
    model = _meta_model(n_routed_experts=0)
    ids = torch.randint(0, 512, (2, 24), device=META)
    out = model.forward_train(ids, ids.masked_fill(ids < 3, -100), mtp_weight=0.3)
    assert on_meta(out.loss, out.lm_loss, out.mtp_loss, out.aux_loss)
    out.loss.backward()
    assert on_meta(*(p.grad for p in model.parameters() if p.grad is not None))
    assert on_meta(model(ids))


def test_router_experts_and_sequence_aux_loss():
    for cfg in (preset("tiny"), preset("tiny", n_group=2, topk_group=1), preset("tiny", scoring_func="softmax",
                                                                             topk_method="greedy")):
        with META:
            router, moe, experts = Router(cfg), MoE(cfg), GroupedExperts(cfg)
        x = torch.randn(10, cfg.hidden_size, device=META)
        w, idx, scores = router(x)
        assert on_meta(w, idx, scores) and idx.shape == (10, cfg.num_experts_per_tok)
        aux = moe.sequence_aux_loss(scores.view(2, 5, -1), idx.view(2, 5, -1), 1e-4)
        assert on_meta(aux) and aux.shape == ()
        assert on_meta(experts.forward_padded(torch.randn(cfg.n_routed_experts, 3, cfg.hidden_size, device=META)))


def test_grpo_loss_tensors():
    logp = torch.randn(4, 6, device=META, requires_grad=True)
    old, ref = torch.randn(4, 6, device=META), torch.randn(4, 6, device=META)
    adv = grpo.group_advantages(torch.rand(4, device=META), 2)
    mask = torch.ones(4, 6, device=META)
    for how in grpo.AGGREGATIONS:
        loss, diag = grpo.grpo_loss_tensors(logp, old, adv, mask, ref_logp=ref, beta=0.01, aggregation=how)
        assert on_meta(loss, *diag.values())
        loss.backward()
    assert on_meta(grpo.token_log_probs(torch.randn(4, 6, V, device=META), torch.randint(0, V, (4, 6), device=META)))


def test_attention_naive_and_absorbed_paths():
    cfg = preset("tiny")
    with META:
        att = MLA(cfg)
    B, T, L, H = 2, 3, 7, cfg.num_attention_heads
    q_nope = torch.randn(B, T, H, cfg.qk_nope_head_dim, device=META)
    q_rope = torch.randn(B, T, H, cfg.qk_rope_head_dim, device=META)
    latent, k_rope = torch.randn(B, T, cfg.kv_lora_rank, device=META), torch.randn(B, T, cfg.qk_rope_head_dim, device=META)
    assert on_meta(att._naive(q_nope, q_rope, latent, k_rope))
    kv = torch.randn(B, L, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=META)
    for bias in (None, torch.zeros(B, T * H, L, device=META)):
        for dtype in (torch.float32, torch.bfloat16):
            assert on_meta(att._absorbed(q_nope, q_rope, kv.to(dtype), bias))


def test_fp8_quantisers_gemm_layouts_and_wrappers(monkeypatch):
    x, w = torch.randn(5, 200, device=META), torch.randn(40, 200, device=META)
    for q, s in (quantize_tiles(x), quantize_blocks(w)):
        assert on_meta(q, s)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr, FP8Options(backend="auto"))
    y.sum().backward()
    assert on_meta(y, xr.grad, wr.grad)
    assert on_meta(fp8_bmm(torch.randn(3, 4, 64, device=META), torch.randn(3, 32, 64, device=META)))
    # The blockwise path's padding and scale layouts, with a shape-only stand-in for the CUDA kernel.
    monkeypatch.setattr(fp8_gemm, "_native_scaled_mm", lambda a, b, sa, ra, sb, rb: a.float() @ b.float())
    (a_q, a_s), (b_q, b_s) = quantize_tiles(x[None]), quantize_blocks(w[None])
    for b_blocks, (bq, bs) in ((True, (b_q, b_s)), (False, quantize_tiles(w[None]))):
        mats = fp8_gemm.blockwise_operands(a_q[0], a_s[0], bq[0], bs[0], b_blocks)
        assert on_meta(*mats, fp8_gemm.gemm(a_q, a_s, bq, bs, b_blocks, "blockwise", 128))
    # A whole FP8 model: the swapped classes build every tensor on the input's device.
    model = enable_fp8(_meta_model(n_routed_experts=0))
    ids = torch.randint(0, 512, (2, 16), device=META)
    model.forward_train(ids, ids).loss.backward()


def test_kl_and_advantages_shapes_on_meta():
    r = torch.rand(8, device=META)
    assert on_meta(grpo.group_advantages(r, 4), grpo.kl_estimator(r, r))
    assert F.cross_entropy(torch.randn(4, V, device=META), torch.randint(0, V, (4,), device=META)).device == META


DSA = dict(index_topk=4, index_n_heads=2, index_head_dim=16)  # V3.2: fewer top-k than cached tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_new", [1, 2])
@pytest.mark.parametrize("arch", [{}, DSA], ids=["v3", "v3.2"])
def test_a_whole_decode_step_forward_reads_nothing_back(dtype, n_new, arch):
    """One engine decode step's model calls on a paged cache view, all on meta: plain decoding (one token
    per row) and the two-token speculative verify plus its MTP refill. A meta tensor has no values, so
    any read back to the host (`.tolist()`, `int(t)`, `bool(t)`, a data-dependent shape such as bincount or
    a boolean mask) raises here: the pure model path that runs on a GPU has no host sync per token beyond
    the engine's read of the sampled ids. Rows sit at different positions, so the score mask is built; the
    MoE layers take the padded GEMM in fp32 (a decode batch sized from shapes) and grouped_mm in bf16; a
    V3.2 model's indexer selects its top-k of the cached tokens (its keys a second cache stream)."""
    from nanoseek.infer.cache import PagedCache

    model = _meta_model(num_nextn_predict_layers=1, **arch).cast(dtype).eval()
    cache = PagedCache.for_model(model, num_blocks=12, block_size=4, dtype=dtype, device=META)
    tables, starts = [[3, 7, 1], [0, 5], [9, 2, 4, 11]], [9, 5, 13]  # host bookkeeping, as the engine keeps it
    B = len(tables)
    ids = torch.randint(0, 512, (B, n_new), device=META)
    with torch.no_grad():
        view = cache.view(tables, starts, n_new)
        assert not view.prefill and view.kv_len == max(starts) + n_new
        logits, hidden = model.forward_cached(ids, view)
        mtp_logits, _ = model.mtp_forward_cached(hidden, ids, view)
    assert on_meta(logits, hidden, mtp_logits)
    assert logits.shape == (B, n_new, 512) and mtp_logits.shape == (B, n_new, 512)
    # Off the CPU only bf16 has a native grouped_mm (CUDA's fallback for fp32 copies the offsets to the host
    # and loops over the experts); the padded path sizes a decode batch's buffer from shapes instead.
    experts = model.layers[1].mlp.experts
    x, counts = torch.randn(B * 6, 64, device=META, dtype=dtype), torch.zeros(8, dtype=torch.long, device=META)
    assert experts.use_grouped_mm(x, counts) == (dtype == torch.bfloat16)
    assert experts.capacity(counts, B) == B
    # The probe works: the same step with device start positions only (no host copy) must read them back.
    with pytest.raises((RuntimeError, NotImplementedError)):
        cache.view(tables, torch.tensor(starts, device=META), n_new)
