"""The output head's log-probability of one chosen token per row, without an autograd graph over [N, V].

    log p(t_n | h_n) = z_n[t_n] - logsumexp(z_n),    z_n = h_n W^T    (h [N, D], head W [V, D], t [N])

is what both the language-model cross-entropy (its negative mean) and GRPO's per-token log-probabilities
are made of. Through `model(ids)` and autograd, the head scores every position (prompt and padding
included), keeps the logits [B, T, V] for the backward, and the backward of logsumexp and gather builds
two more [B, T, V] tensors. `head_log_probs` takes only the rows the caller scores and a custom autograd
function handles them in row chunks: the forward keeps one logsumexp per row; the backward forms each
chunk's gradient in place,

    dL/dz_n = g_n (onehot(t_n) - softmax(z_n)),    dL/dh = (dL/dz) W,    dL/dW = (dL/dz)^T h,

from logits it kept (when all of them fit in `keep_bytes`) or recomputes (when they do not, trading one
more head GEMM for memory that no longer grows with N x V). The arithmetic is the same as the autograd
path's; only summation order can differ, so values agree to float rounding (tests/test_head.py).

When V is not a multiple of 16 the logits GEMM runs on the head padded with zero rows and the extra
columns are dropped before anything reads them: CPU GEMMs run such odd widths at a fraction of their
speed (benchmarks/bench_grpo_trl.py's vocabulary is one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits of at most this many elements per chunk (32 MiB in fp32): large GEMMs, bounded scratch memory.
CHUNK_ELEMENTS = 1 << 23
# Keep every chunk's logits for the backward while they fit in this many bytes; beyond, recompute them.
KEEP_BYTES = 1 << 28
_ALIGN = 16


def _logits(h: torch.Tensor, w: torch.Tensor, w_padded: torch.Tensor | None) -> torch.Tensor:
    if w_padded is None:
        return h @ w.t()
    return (h @ w_padded.t())[:, : w.shape[0]]


def _shifted_exp(h, w_VD, w_padded, acc, t=None):
    """For this chunk's logits z: exp(z - max z) per row (in z's buffer), its row sums, the row max and,
    given targets t [n, 1], the target logits z_t (read before the buffer is overwritten)."""
    z = _logits(h, w_VD, w_padded).to(acc)
    z_t = z.gather(1, t).squeeze(1) if t is not None else None
    m = z.amax(dim=1)
    e = z.sub_(m[:, None]).exp_()  # in place, also on the padded GEMM's strided view
    return e, e.sum(dim=1), m, z_t


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk, keep):
        N, V = h_ND.shape[0], w_VD.shape[0]
        pad = -V % _ALIGN
        w_padded = F.pad(w_VD, (0, 0, 0, pad)) if pad and h_ND.is_cpu else None
        acc = torch.promote_types(h_ND.dtype, torch.float32)  # softmax statistics in fp32 at least
        out_N = h_ND.new_empty(N, dtype=acc)
        sum_N = h_ND.new_empty(N, dtype=acc)
        kept = []
        for s in range(0, N, chunk):
            t = t_N[s: s + chunk, None]
            e, sums, m, z_t = _shifted_exp(h_ND[s: s + chunk], w_VD, w_padded, acc, t)
            out_N[s: s + chunk] = z_t - (m + sums.log())  # z_t - logsumexp(z), without overflow
            sum_N[s: s + chunk] = sums
            if keep:
                kept.append(e)
        ctx.save_for_backward(h_ND, w_VD, t_N, sum_N)
        # Kept outside save_for_backward so that backward may overwrite them (a second backward recomputes).
        ctx.kept, ctx.chunk, ctx.w_padded, ctx.acc = kept, chunk, w_padded, acc
        return out_N

    @staticmethod
    def backward(ctx, g_N):
        h_ND, w_VD, t_N, sum_N = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, []
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros_like(w_VD) if need_w else None
        g_N = g_N.to(ctx.acc)
        for i, s in enumerate(range(0, h_ND.shape[0], chunk)):
            h = h_ND[s: s + chunk]
            e = kept[i] if kept else _shifted_exp(h, w_VD, ctx.w_padded, ctx.acc)[0]
            g = g_N[s: s + chunk]
            # dL/dz = g * (onehot(t) - softmax(z)), in e's buffer: softmax = e / sum e.
            gz = e.mul_((-g / sum_N[s: s + chunk])[:, None])
            gz.scatter_add_(1, t_N[s: s + chunk, None], g[:, None])
            gz = gz.to(h_ND.dtype)
            if need_h:
                grad_h[s: s + chunk] = gz @ w_VD
            if need_w:
                grad_w.addmm_(gz.t(), h)
        return grad_h, grad_w, None, None, None


def head_log_probs(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                   chunk_elements: int = CHUNK_ELEMENTS, keep_bytes: int = KEEP_BYTES) -> torch.Tensor:
    """log softmax(h W^T)[target] per row, [N] in float32 (float64 for float64 inputs).

    h [N, D] are the scored rows, already normed; W [V, D] the head; targets [N] in [0, V) (an index outside
    raises in the gather on CPU; no device sync checks it here). Differentiable in h and W (see the module
    docstring); under autocast the head GEMM runs in the autocast dtype, as F.linear's would."""
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"head_log_probs needs h [N, D] and W [V, D], got {tuple(h_ND.shape)} and "
                         f"{tuple(weight_VD.shape)}")
    if targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"one target per row: {h_ND.shape[0]} rows but targets of shape {tuple(targets_N.shape)}")
    N, V = h_ND.shape[0], weight_VD.shape[0]
    if N == 0:  # nothing scored: an empty result that still belongs to h's graph
        return h_ND.float().sum(dim=1) * 0.0
    chunk = max(1, chunk_elements // V)
    keep = N * V * 4 <= keep_bytes
    if torch.is_autocast_enabled(h_ND.device.type):  # the head GEMM in the autocast dtype, as F.linear would be
        dt = torch.get_autocast_dtype(h_ND.device.type)
        h_ND, weight_VD = h_ND.to(dt), weight_VD.to(dt)
        with torch.autocast(h_ND.device.type, enabled=False):
            return _HeadLogProbs.apply(h_ND, weight_VD, targets_N, chunk, keep)
    return _HeadLogProbs.apply(h_ND, weight_VD, targets_N, chunk, keep)
