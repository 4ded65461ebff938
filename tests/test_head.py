"""nanoseek.train.head: the head's chosen-token log-probabilities equal log_softmax(h W^T)[t], values and
gradients, in every mode (logits kept or recomputed, one chunk or many, aligned or odd vocabularies)."""

import pytest
import torch

from nanoseek.train.head import head_log_probs


def _reference(h, w, t):
    return torch.log_softmax(h @ w.t(), dim=-1).gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("V", [7, 485, 512])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk_rows", [1000, 13])
def test_values_and_gradients_match_log_softmax(V, keep, chunk_rows):
    torch.manual_seed(V + chunk_rows)
    N, D = 120, 24
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    g = torch.randn(N, dtype=torch.float64)
    out = head_log_probs(h, w, t, chunk_elements=chunk_rows * V, keep_bytes=(1 << 40) if keep else 0)
    ref = _reference(h, w, t)
    assert out.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    gh, gw = torch.autograd.grad((out * g).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
    assert torch.allclose(gh, rh, rtol=0, atol=1e-12)
    assert torch.allclose(gw, rw, rtol=0, atol=1e-12)


def test_fp32_matches_and_large_logit_gaps_stay_finite():
    torch.manual_seed(0)
    h = torch.randn(64, 32) * 30  # logits hundreds apart: a naive exp would underflow to log(0) = -inf
    w = torch.randn(50, 32)
    t = torch.randint(0, 50, (64,))
    out = head_log_probs(h, w, t)
    ref = _reference(h.double(), w.double(), t).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-3)
    assert out.min() < -100  # the test does exercise the gap


def test_second_backward_recomputes_instead_of_reusing_overwritten_logits():
    torch.manual_seed(1)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (10,))
    out = head_log_probs(h, w, t)
    first = torch.autograd.grad(out.sum(), h, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), h)[0]
    assert torch.allclose(first, second, rtol=0, atol=1e-12)


def test_only_h_or_only_w_and_no_rows():
    torch.manual_seed(2)
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(6, 4)
    t = torch.randint(0, 6, (5,))
    out = head_log_probs(h, w, t)
    out.sum().backward()
    assert h.grad is not None and w.grad is None
    empty = head_log_probs(h[:0], w, t[:0])
    assert empty.shape == (0,)
    empty.sum().backward()  # still part of h's graph


def test_autocast_bf16_runs_the_head_in_bf16_and_stays_close():
    torch.manual_seed(3)
    h = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_log_probs(h, w, t)
    ref = _reference(h.bfloat16().float(), w.bfloat16().float(), t)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.1)
    out.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="h \\[N, D\\]"):
        head_log_probs(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one target per row"):
        head_log_probs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
