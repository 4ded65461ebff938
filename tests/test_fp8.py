"""Fine-grained FP8 (V3 section 3.3): tile/block quantization, the FP8 linear's three GEMMs, model wiring."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanoseek.config import preset
from nanoseek.model import Transformer
from nanoseek.model.moe import GroupedExperts
from nanoseek.train.fp8 import (E4M3, E4M3_MAX, FP8GroupedExperts, FP8Linear, FP8Options, dequantize_blocks,
                                dequantize_tiles, enable_fp8, fp8_linear, quantize_blocks, quantize_tiles)

# E4M3 has 3 mantissa bits: round-to-nearest is off by at most 2^-4 of the value (normal range).
HALF_ULP = 2.0 ** -4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_tile_shapes_scales_and_roundtrip():
    x = torch.randn(3, 5, 300) * torch.logspace(-3, 3, 300)  # wide dynamic range across channels
    q, s = quantize_tiles(x, 128)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (3, 5, 3)  # ceil(300/128) tiles per token
    # Each 1x128 tile's scale is its max-abs / 448: the largest element lands exactly on 448.
    ref = torch.stack([x[..., i:i + 128].abs().amax(-1) for i in (0, 128, 256)], -1) / E4M3_MAX
    torch.testing.assert_close(s, ref)
    assert q.float().abs().amax().item() == E4M3_MAX
    r = dequantize_tiles(q, s, 128)
    big = x.abs() > s.repeat_interleave(128, -1)[..., :300] * 2.0 ** -6  # normal range of E4M3
    assert ((r - x).abs() <= HALF_ULP * x.abs() + 1e-30)[big].all()
    # Per-tile scaling keeps a small-magnitude tile accurate even next to a huge one.
    assert _rel(r[..., :128], x[..., :128]) < 0.03


def test_block_shapes_and_scales():
    w = torch.randn(2, 200, 300)
    q, s = quantize_blocks(w, 128)
    assert q.shape == w.shape and s.shape == (2, 2, 3)  # per matrix: ceil(200/128) x ceil(300/128) blocks
    torch.testing.assert_close(s[1, 1, 2], w[1, 128:, 256:].abs().max() / E4M3_MAX)
    assert _rel(dequantize_blocks(q, s, 128), w) < 0.03
    zero_q, zero_s = quantize_blocks(torch.zeros(4, 4), 128)
    assert torch.equal(zero_s, torch.ones(1, 1)) and zero_q.float().abs().sum() == 0  # no division by zero


def _grads(fn, x, w):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, w.grad


def test_fp8_linear_forward_and_all_three_gemms_close_to_fp32():
    torch.manual_seed(0)
    x, w = torch.randn(192, 256), torch.randn(160, 256) * 0.05
    y8, dx8, dw8 = _grads(lambda a, b: fp8_linear(a, b), x, w)
    y, dx, dw = _grads(lambda a, b: a @ b.t(), x, w)
    for got, ref in ((y8, y), (dx8, dx), (dw8, dw)):
        assert 0 < _rel(got, ref) < 0.06  # FP8 noise: clearly non-zero, clearly small


def test_fp8_linear_equals_dequantized_fp32_math():
    """Emulation is exact FP8 arithmetic: the GEMMs equal fp32 matmuls of the quantized operands with
    the report's tile orientations (1x128 for forward/dgrad operands, 128x1 for both wgrad operands)."""
    torch.manual_seed(1)
    x, w, dy = torch.randn(130, 200), torch.randn(70, 200), torch.randn(130, 70)
    qx = dequantize_tiles(*quantize_tiles(x))
    qw = dequantize_blocks(*quantize_blocks(w))
    qdy = dequantize_tiles(*quantize_tiles(dy))
    qdy_t = dequantize_tiles(*quantize_tiles(dy.t()))  # 128x1 tiles of dy
    qx_t = dequantize_tiles(*quantize_tiles(x.t()))    # 128x1 tiles of x
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr)
    y.backward(dy)
    torch.testing.assert_close(y, qx @ qw.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, qdy @ qw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wr.grad, qdy_t @ qx_t.t(), rtol=1e-5, atol=1e-5)


def _cpu_scaled_mm_error() -> str | None:
    """Why torch._scaled_mm cannot run on CPU tensors in this torch build (None when it can): one call with
    valid row-wise-scaled inputs of the kind nanoseek.train.fp8 passes, so nothing of ours is involved."""
    a = torch.ones(16, 32).to(E4M3)
    b = torch.ones(16, 32).to(E4M3).t()  # column-major, as _scaled_mm wants
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:  # e.g. "Could not run 'aten::_scaled_mm' ... 'CPU' backend"
        return str(e).splitlines()[0]
    return None


def test_scaled_mm_path_matches_emulation():
    """The GPU code path (torch._scaled_mm per 128-wide K slice) runs, slowly, on CPU too."""
    unavailable = _cpu_scaled_mm_error()
    if unavailable:  # a property of the torch build, not a missing dependency: a plain skip
        pytest.skip(f"torch._scaled_mm is not available for CPU tensors in this build: {unavailable}")
    torch.manual_seed(2)
    x, w = torch.randn(32, 256), torch.randn(48, 256)
    y_sm, dx_sm, dw_sm = _grads(lambda a, b: fp8_linear(a, b, FP8Options(backend="scaled_mm")), x, w)
    y, dx, dw = _grads(lambda a, b: fp8_linear(a, b, FP8Options(backend="emulate")), x, w)
    for got, ref in ((y_sm, y), (dx_sm, dx), (dw_sm, dw)):
        assert _rel(got, ref) < 1e-2  # the same FP8 values; only the BF16 per-slice outputs differ


def test_enable_fp8_swaps_the_right_layers_and_keeps_names():
    model = Transformer(preset("tiny"))
    names = list(model.state_dict())
    enable_fp8(model, SimpleNamespace(enabled=True))
    assert list(model.state_dict()) == names
    att = model.layers[0].self_attn
    for lin in (att.q_a_proj, att.q_b_proj, att.kv_a_proj_with_mqa, att.kv_b_proj, att.o_proj,
                model.layers[0].mlp.down_proj, model.layers[1].mlp.shared_experts.gate_proj):
        assert type(lin) is FP8Linear
    assert type(model.layers[1].mlp.experts) is FP8GroupedExperts
    for hp in (model.lm_head, model.mtp[0].eh_proj):
        assert isinstance(hp, nn.Linear) and not isinstance(hp, FP8Linear)
    assert type(model.embed_tokens) is nn.Embedding


def test_fp8_experts_close_to_high_precision():
    torch.manual_seed(3)
    cfg = preset("tiny", moe_intermediate_size=64)
    ex = GroupedExperts(cfg)
    nn.init.normal_(ex.gate_up_proj, std=0.1)
    nn.init.normal_(ex.down_proj, std=0.1)
    ex8 = copy.deepcopy(ex)
    enable_fp8(nn.ModuleDict({"mlp": nn.ModuleDict({"experts": ex8})}))
    counts = torch.tensor([5, 0, 9, 1, 3, 7, 2, 3])
    x = torch.randn(int(counts.sum()), cfg.hidden_size)
    dy = torch.randn(x.shape)
    ys = []
    for mod in (ex, ex8):
        xr = x.clone().requires_grad_()
        y = mod(xr, counts)
        y.backward(dy)
        ys.append((y.detach(), xr.grad, mod.gate_up_proj.grad, mod.down_proj.grad))
    for ref, got in zip(*ys):  # two chained FP8 GEMMs: errors compound a little
        assert 0 < _rel(got, ref) < 0.1
    # The path MoE.route_local takes (a padded buffer over all experts) is FP8 too.
    buf = torch.randn(8, 4, cfg.hidden_size)
    got, ref = ex8.forward_padded(buf), ex.forward_padded(buf)
    assert 0 < _rel(got, ref) < 0.1


def test_fp8_training_steps_track_fp32():
    def run(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        model = Transformer(preset("tiny"))
        if fp8:
            enable_fp8(model, SimpleNamespace(enabled=True))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(5)
        data = torch.arange(32).repeat(4, 2)[:, :33] % 17  # a learnable periodic sequence
        losses = []
        for _ in range(5):
            x = data[torch.randperm(4, generator=gen)]
            out = model.forward_train(x[:, :-1], x[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.lm_loss.item())
        return losses

    ref, got = run(False), run(True)
    assert got[-1] < got[0] - 0.3  # it learns
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=0.02)
