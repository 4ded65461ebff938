"""nanoseek.infer.fast.accelerate: the CPU decode transform computes what the pure model computes, is
idempotent and undoable, runs the pure forward whenever it trains, and leaves FP8, expert-parallel,
FSDP and GPU models alone. The torch-only paths here; tests/test_kernels.py covers the C++ ones."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams, fast
from nanoseek.infer.fast import kernels, modules
from nanoseek.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", **{"initializer_range": 0.1, **kw})).eval()


def classes(model):
    return [type(m) for m in model.modules()]


def test_accelerate_swaps_classes_idempotently_and_restore_undoes_it():
    model = tiny()
    pure_classes, state = classes(model), {k: v.clone() for k, v in model.state_dict().items()}
    assert fast.accelerate(model) is model
    swapped = classes(model)
    for pure, now in zip(pure_classes, swapped):
        assert now is modules.SWAPS.get(pure, pure)
    assert {modules.FastLinear, modules.FastRMSNorm, modules.FastExperts, modules.FastMoE, modules.FastBlock,
            modules.FastMTPModule} <= set(swapped)
    fast.accelerate(model)
    assert classes(model) == swapped  # idempotent
    assert list(model.state_dict()) == list(state) and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # After decoding (which caches C++ objects on the blocks), copies and pickles still work and decode alike.
    engine_tokens = Engine(model, max_batch_size=1, max_len=16).generate_batch([[5, 6]], SamplingParams(max_tokens=4))
    buf = io.BytesIO()
    torch.save(model, buf)
    for clone in (copy.deepcopy(model), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert classes(clone) == swapped
        assert Engine(clone, max_batch_size=1, max_len=16).generate_batch(
            [[5, 6]], SamplingParams(max_tokens=4))[0].token_ids == engine_tokens[0].token_ids
    fast.restore(model)
    assert classes(model) == pure_classes


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_interleave": False, "n_shared_experts": 0}])
def test_accelerated_decoding_equals_the_pure_model(overrides, paged_rows):
    """Logits of a prefill, single-token steps, a mixed-position verify and the MTP head, torch paths only."""
    pure = tiny(**overrides)
    acc = fast.accelerate(copy.deepcopy(pure))
    ids = torch.randint(0, pure.config.vocab_size, (3, 12))
    slots = torch.tensor([2, 0, 1])
    outs = []
    for model in (pure, acc):
        _, view = paged_rows(model, 3, 16)
        with torch.inference_mode(), kernels.disabled():
            pre, _ = model.forward_cached(ids[:, :10], view(slots, torch.zeros(3, dtype=torch.long), 10))
            step, h = model.forward_cached(ids[:, 10:11], view(slots, torch.full((3,), 10), 1))
            verify, _ = model.forward_cached(ids[:, 10:12], view(slots, torch.tensor([10, 9, 10]), 2))
            mtp, _ = model.mtp_forward_cached(h, ids[:, 11:12], view(slots, torch.full((3,), 10), 1))
            full = model(ids)
        outs.append((pre, step, verify, mtp, full))
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_training_after_accelerate_is_exactly_the_pure_computation():
    """GRPO trains the model its engine decoded with: in train mode, with autograd on, or under autocast,
    every swapped module must compute bit for bit what the pure one does (losses, gradients, a step)."""
    pure = tiny()
    acc = copy.deepcopy(pure)
    Engine(acc, max_batch_size=2, max_len=16).generate_batch([[3, 4, 5]], SamplingParams(max_tokens=3))
    assert type(acc.layers[1]) is modules.FastBlock  # the engine accelerated it
    ids = torch.randint(0, pure.config.vocab_size, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(acc(ids), pure(ids))  # autocast: the pure paths
    ref = pure(ids)
    assert torch.equal(acc(ids), ref)  # eval mode, autograd on
    results = []
    for model in (pure, acc):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = model.forward_train(ids[:, :-1], ids[:, 1:], mtp_weight=0.3, aux_alpha=1e-3)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        results.append((out.loss.detach(), grads, [p.detach().clone() for p in model.parameters()],
                        [m.load.clone() for m in model.moe_layers()]))
    (l0, g0, p0, n0), (l1, g1, p1, n1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)) and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(a, b) for a, b in zip(n0, n1))  # load counting for the balancer too


def test_few_token_moe_path_equals_batched(monkeypatch):
    """Without the kernels, a few tokens run one GEMV pair per assignment; it must equal the pure path."""
    pure = tiny(initializer_range=0.2).layers[1].mlp
    moe = fast.accelerate(copy.deepcopy(pure))
    assert type(moe) is modules.FastMoE
    calls = []
    monkeypatch.setattr(modules, "forward_few", lambda *a, f=modules.forward_few: calls.append(1) or f(*a))
    T = modules.FEW_ASSIGNMENTS // moe.cfg.num_experts_per_tok + 8  # enough tokens for the batched path
    x = torch.randn(1, T, moe.cfg.hidden_size)
    with torch.no_grad(), kernels.disabled():
        batched, _ = pure(x)
        for n in (1, 2, 3):  # one token (plain decoding), two (a speculative verify), three
            few = torch.cat([moe(x[:, t:t + n])[0] for t in range(0, T - n + 1, n)], dim=1)
            torch.testing.assert_close(few, batched[:, : few.shape[1]], rtol=1e-5, atol=1e-6)
    assert calls  # the few-token path ran


@pytest.mark.parametrize("threads", [1, 2])
def test_few_row_linear_layouts_equal_f_linear(threads):
    """Without the kernels, a few rows take the split GEMV or W @ x^T; the values must be F.linear's."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        w = torch.randn(384, 256)  # above RELAYOUT_MIN: the relayouts apply
        with torch.no_grad(), kernels.disabled():
            for rows in (1, 2, 5, 64, 65, 200):
                x = torch.randn(rows, 256)
                for xin in (x, x[:, None, :], x.view(1, rows, 256)):
                    got = modules.few_rows_linear(xin, w)
                    assert got.shape == xin.shape[:-1] + (384,) and got.is_contiguous()
                    torch.testing.assert_close(got, nn.functional.linear(xin, w), rtol=1e-5, atol=1e-5)
                # A strided weight (a slice of stacked experts, transposed) still gives the same result.
                torch.testing.assert_close(modules.few_rows_linear(x, w.t().contiguous().t()), x @ w.t(),
                                           rtol=1e-5, atol=1e-5)
            assert modules.few_rows_linear(torch.zeros(0, 256), w).shape == (0, 384)
        lin = fast.accelerate(nn.Linear(256, 384, bias=False))
        x = torch.randn(2, 256, requires_grad=True)
        lin(x).sum().backward()  # autograd on: F.linear and its backward
        torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_fp8_and_expert_parallel_modules_are_left_alone(monkeypatch):
    from nanoseek.train.fp8 import FP8GroupedExperts, FP8Linear, enable_fp8
    from nanoseek.train.parallel import ExpertParallelMoE

    model = tiny()
    enable_fp8(model)
    model.layers[2].mlp.__class__ = ExpertParallelMoE  # as parallelize() would (not run here)
    fast.accelerate(model)
    a = model.layers[1].self_attn
    assert type(a.q_a_proj) is FP8Linear and type(model.layers[1].mlp.experts) is FP8GroupedExperts
    assert type(model.layers[2].mlp) is ExpertParallelMoE and type(model.layers[1].mlp) is modules.FastMoE
    assert type(model.lm_head) is modules.FastLinear  # FP8 leaves the head in high precision
    for block in (model.layers[1], model.layers[2]):
        assert not modules._KernelPlan(block).plain()
    # enable_fp8 after accelerate converts the swapped linears too.
    late = fast.accelerate(tiny())
    enable_fp8(late)
    assert type(late.layers[0].self_attn.o_proj) is FP8Linear and type(late.layers[1].mlp.experts) is FP8GroupedExperts


def test_modules_under_fsdp_are_left_alone():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for block in model.layers:
            fully_shard(block)
        fast.accelerate(model)
        for block in model.layers:
            assert all(type(m) not in modules.SWAPS.values() for m in block.modules())
        assert type(model.lm_head) is modules.FastLinear and type(model.mtp[0]) is modules.FastMTPModule
    finally:
        dist.destroy_process_group()


def test_a_model_off_the_cpu_is_untouched_and_builds_nothing(monkeypatch):
    """(A GPU model in spirit: the meta device stands in for it on a CPU-only machine.)"""
    def no_build(*a, **k):
        raise AssertionError("the kernels must not be built for a model off the CPU")

    monkeypatch.setattr(fast.build.KERNELS, "load", no_build)
    with torch.device("meta"):
        model = Transformer(preset("tiny"))
    before = classes(model)
    assert fast.accelerate(model) is model and classes(model) == before
