"""The C++ decode kernels (nanoseek.model.kernels) against the torch paths they replace."""

import pytest
import torch

from nanoseek.config import preset
from nanoseek.model import Transformer, kernels

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C++ toolchain: the torch paths are used")


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_matmul_equals_f_linear(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for n_out, n_in in [(384, 256), (1000, 203), (8, 5), (4096, 512)]:  # odd sizes exercise the tails
            w = torch.randn(n_out, n_in)
            for rows in (1, 2, 3, 7, 8, 9, 16, 32):
                x = torch.randn(rows, n_in)
                torch.testing.assert_close(kernels.rows_matmul(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(old)


def test_experts_rows_equals_torch_experts():
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.2, n_routed_experts=8, num_experts_per_tok=3)
    moe = Transformer(cfg).layers[1].mlp.eval()
    with torch.no_grad():
        for n in (1, 2, 5, 40):  # 40 tokens x 3 puts more than 8 rows (one register block) on some experts
            x = torch.randn(n, cfg.hidden_size)
            w, idx, _ = moe.gate(x)
            ref = moe.route_local(x, w, idx, torch.bincount(idx.flatten(), minlength=8))
            got = kernels.experts_rows(x, moe.experts.gate_up_proj, moe.experts.down_proj, idx, w)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="expert id out of range"):
            kernels.experts_rows(x[:1], moe.experts.gate_up_proj, moe.experts.down_proj,
                                 torch.tensor([[0, 1, 8]]), w[:1])


VARIANTS = [
    {},
    {"q_lora_rank": None, "rope_interleave": False},
    {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False, "n_group": 1, "topk_group": 1},
    {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_shared_experts": 0},
    {"first_k_dense_replace": 2},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_decode_blocks_in_kernels_equal_the_torch_blocks(overrides):
    """Transformer.forward_cached runs decode steps through kernels.block_decode; logits and the MTP head's
    must equal the Python blocks' (kernels disabled) for every routing / attention variant."""
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1, hidden_size=256, moe_intermediate_size=256, **overrides)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    slots = torch.tensor([2, 0, 1])  # not a contiguous range: the cache rows are gathered
    outs = []
    for use in (True, False):
        cache = model.new_cache(3, 16)
        with torch.inference_mode(), (kernels.disabled() if not use else torch.inference_mode()):
            _, h = model.forward_cached(ids[:, :10], torch.zeros(3, dtype=torch.long), slots, cache)
            view_x = model.embed_tokens(ids[:, 10:11])
            from nanoseek.model.attention import CacheView
            assert model._decode_in_kernels(view_x, CacheView(cache, slots, torch.full((3,), 10), 1),
                                           list(model.layers) + list(model.mtp)) == use
            step, h1 = model.forward_cached(ids[:, 10:11], torch.full((3,), 10), slots, cache)
            verify, _ = model.forward_cached(ids[:, 10:12], torch.tensor([10, 9, 10]), slots, cache)  # mixed starts
            mtp, _ = model.mtp_forward_cached(h1, ids[:, 11:12], torch.full((3,), 10), slots, cache)
            mixed, _ = model.forward_cached(ids[:, 11:12], torch.tensor([11, 7, 11]), slots, cache)  # masked keys
        outs.append((step, verify, mtp, mixed))
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_a_bf16_cache_keeps_the_torch_blocks():
    """The kernel block reads and writes an fp32 cache; an engine built with another cache dtype must still
    decode (through the Python blocks), not fail."""
    from nanoseek.infer import Engine, SamplingParams

    torch.manual_seed(0)
    model = Transformer(preset("tiny", initializer_range=0.1)).eval()
    engine = Engine(model, max_batch_size=2, max_len=24, dtype=torch.bfloat16)
    out = engine.generate_batch([[3, 4, 5], [6, 7]], SamplingParams(max_tokens=5))
    assert [len(c.token_ids) for c in out] == [5, 5]
