"""The FP8 GEMM backends on CPU: backend choice, shape guards (padding), and the blockwise kernels' layouts.

The native block-scaled kernels need a Hopper GPU (tests/test_gpu.py runs them). Here the one function that
calls them, fp8_gemm._native_scaled_mm, is replaced by `kernel_contract`: the checks PyTorch makes before it
calls cuBLASLt (aten/src/ATen/native/cuda/ScaledBlas.cpp, _scaled_block1x128_block128x128 and
_scaled_block1x128_block1x128, plus the 16-divisibility and row-major x column-major rules) and the product
the kernel computes from those scales. Everything around the call (padding, scale layouts, slicing back, the
per-expert loop, autograd) then runs for real and must agree with the emulation.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanoseek.config import preset
from nanoseek.model.moe import GroupedExperts
from nanoseek.train import fp8_gemm
from nanoseek.train.fp8 import E4M3, FP8Options, enable_fp8, fp8_linear, quantize_blocks, quantize_tiles
from nanoseek.train.fp8_gemm import blockwise_operands, gemm, resolve, round_up

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def kernel_contract(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b):
    """What the blockwise kernels accept, and what they return (FP32)."""
    M, K = mat_a.shape
    K2, N = mat_b.shape
    assert K == K2 and mat_a.dtype == mat_b.dtype == E4M3
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert K % 16 == 0 and N % 16 == 0, "trailing dims must be divisible by 16"
    assert mat_a.stride() == (K, 1) and mat_b.stride() == (1, K), "row-major x column-major only (Hopper)"
    L = math.ceil(K / 128)
    L4 = round_up(L, 4)

    def outer_dim_major(s, rows):  # strides (1, rows), or a single column
        return s.shape == (rows, L) and s.stride(0) == 1 and (s.stride(1) == rows or (L == 1 and s.stride(1) == 1))

    assert recipe_a == "1x128" and outer_dim_major(scale_a, M), (scale_a.shape, scale_a.stride())
    a = mat_a.float() * scale_a.repeat_interleave(128, 1)[:, :K]
    if recipe_b == "128x128":
        nb = math.ceil(N / 128)
        assert scale_b.shape == (L4, nb) and scale_b.stride(0) == 1, (scale_b.shape, scale_b.stride())
        assert scale_b.stride(1) == L4 or (nb == 1 and scale_b.stride(1) == 1), scale_b.stride()
        s = scale_b[:L].repeat_interleave(128, 0)[:K].repeat_interleave(128, 1)[:, :N]  # [K, N]: block (k, n)
    else:
        assert recipe_b == "1x128" and outer_dim_major(scale_b, N), (scale_b.shape, scale_b.stride())
        s = scale_b.t().repeat_interleave(128, 0)[:K]  # element (k, n) scaled by scale_b[n, k // 128]
    return a @ (mat_b.float() * s)


@pytest.fixture
def blockwise_on_cpu(monkeypatch):
    """Let backend="blockwise" run on CPU with kernel_contract standing in for the CUDA kernels."""
    monkeypatch.setattr(fp8_gemm, "blockwise_available", lambda device: None)
    monkeypatch.setattr(fp8_gemm, "_native_scaled_mm", kernel_contract)


def _wide_range(*shape, gen):
    """Values whose magnitude changes by 10^6 across rows and columns: a scale applied to the wrong tile or
    block shows up as a large error, not as rounding noise."""
    x = torch.randn(*shape, generator=gen)
    return x * torch.logspace(-3, 3, shape[-2])[:, None] * torch.logspace(2, -2, shape[-1])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_resolve_picks_and_refuses_clearly():
    assert resolve("auto", 128, CPU) == "emulate"
    assert resolve("emulate", 128, CPU) == "emulate" and resolve("scaled_mm", 128, CPU) == "scaled_mm"
    assert resolve("blockwise", 128, torch.device("meta")) == "emulate"  # meta only propagates shapes
    with pytest.raises(ValueError, match="blockwise.*CUDA device"):
        resolve("blockwise", 128, CPU)
    with pytest.raises(ValueError, match="must be one of"):
        resolve("fast", 128, CPU)
    with pytest.raises(ValueError, match="must be one of"):
        FP8Options(backend="fast")


def test_blockwise_refuses_other_tile_widths(blockwise_on_cpu):
    assert resolve("blockwise", 128, CPU) == "blockwise"
    with pytest.raises(ValueError, match="128-wide tiles; fp8.block is 64"):
        resolve("blockwise", 64, CPU)


@pytest.mark.parametrize("M,N,K", [(7, 40, 200), (130, 256, 640), (16, 16, 128), (33, 129, 1000), (1, 3, 5)])
@pytest.mark.parametrize("b_blocks", [True, False])
def test_blockwise_operands_pad_to_the_kernel_layout(M, N, K, b_blocks):
    g = torch.Generator().manual_seed(M + N + K)
    a_q, a_s = quantize_tiles(torch.randn(M, K, generator=g))
    b = torch.randn(N, K, generator=g)
    b_q, b_s = quantize_blocks(b) if b_blocks else quantize_tiles(b)
    mat_a, scale_a, mat_b, scale_b = blockwise_operands(a_q, a_s, b_q, b_s, b_blocks)
    L = math.ceil(K / 128)
    Mp, Np, Kp = round_up(M, 16), round_up(N, 16), 128 * L
    assert mat_a.shape == (Mp, Kp) and mat_b.shape == (Kp, Np)
    assert scale_a.shape == (Mp, L)
    assert scale_b.shape == ((round_up(L, 4), math.ceil(N / 128)) if b_blocks else (Np, L))
    # The padding is zeros in the data: the real region is untouched.
    assert mat_a.float()[M:].abs().sum() == 0 and mat_a.float()[:, K:].abs().sum() == 0
    assert torch.equal(mat_a[:M, :K].float(), a_q.float()) and torch.equal(mat_b[:K, :N].float(), b_q.t().float())
    assert torch.equal(scale_a[:M], a_s)
    out = kernel_contract(mat_a, mat_b, scale_a, "1x128", scale_b, "128x128" if b_blocks else "1x128")
    assert out.shape == (Mp, Np) and out[M:].abs().sum() == 0 and out[:, N:].abs().sum() == 0


@pytest.mark.parametrize("b_blocks", [True, False])
def test_blockwise_gemm_equals_the_emulation(blockwise_on_cpu, b_blocks):
    g = torch.Generator().manual_seed(3)
    a_q, a_s = quantize_tiles(_wide_range(2, 70, 300, gen=g))
    b = _wide_range(2, 150, 300, gen=g)
    b_q, b_s = quantize_blocks(b) if b_blocks else quantize_tiles(b)
    got = gemm(a_q, a_s, b_q, b_s, b_blocks, "blockwise", 128)
    ref = gemm(a_q, a_s, b_q, b_s, b_blocks, "emulate", 128)
    assert got.shape == ref.shape == (2, 70, 150)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    # A scale laid out for the wrong orientation would not survive this: the blocks differ by 10^6.
    assert _rel(gemm(a_q, a_s, b_q, b_s.flip(-1), b_blocks, "emulate", 128), ref) > 0.5


@pytest.mark.parametrize("shape", [(7, 200, 40), (64, 256, 576), (3, 48, 16)])
def test_fp8_linear_all_three_gemms_blockwise_equal_emulation(blockwise_on_cpu, shape):
    """Forward, dgrad and wgrad through the blockwise path (odd shapes padded) give the emulation's numbers."""
    M, K, N = shape
    g = torch.Generator().manual_seed(M)
    x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1, torch.randn(M, N, generator=g)
    res = {}
    for backend in ("blockwise", "emulate"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, FP8Options(backend=backend))
        y.backward(dy)
        res[backend] = (y.detach(), xr.grad, wr.grad)
    for got, ref in zip(res["blockwise"], res["emulate"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fp8_experts_blockwise_equal_emulation(blockwise_on_cpu):
    torch.manual_seed(4)
    cfg = preset("tiny", moe_intermediate_size=48)
    ex = GroupedExperts(cfg)
    nn.init.normal_(ex.gate_up_proj, std=0.1)
    nn.init.normal_(ex.down_proj, std=0.1)
    mods = {}
    for backend in ("blockwise", "emulate"):
        m = copy.deepcopy(ex)
        enable_fp8(nn.ModuleDict({"mlp": nn.ModuleDict({"experts": m})}), SimpleNamespace(backend=backend))
        mods[backend] = m
    counts = torch.tensor([5, 0, 9, 1, 3, 7, 2, 3])  # capacity 9: not a multiple of 16
    x, dy = torch.randn(int(counts.sum()), cfg.hidden_size), torch.randn(int(counts.sum()), cfg.hidden_size)
    res = {}
    for backend, m in mods.items():
        xr = x.clone().requires_grad_()
        y = m(xr, counts)
        y.backward(dy)
        res[backend] = (y.detach(), xr.grad, m.gate_up_proj.grad, m.down_proj.grad)
    for got, ref in zip(res["blockwise"], res["emulate"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _cpu_scaled_mm_exists() -> bool:
    """Probe the kernel on one aligned 16 x 16 product, so that a failure on the odd shapes below is a failure."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    try:
        torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def test_sliced_scaled_mm_pads_odd_shapes():
    """The row-wise K-sliced backend on shapes that are not multiples of 16 (tiny's kv_a_proj: N = 40)."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(9, 200, generator=g), torch.randn(40, 200, generator=g)
    if not _cpu_scaled_mm_exists():
        pytest.skip("this torch build has no CPU kernel for torch._scaled_mm")
    got = fp8_linear(x, w, FP8Options(backend="scaled_mm"))
    ref = fp8_linear(x, w, FP8Options(backend="emulate"))
    assert _rel(got, ref) < 1e-2  # BF16 slice outputs where FP32 ones are refused; FP32 on this CPU build
