"""Weight-only quantized decoding: bf16 and int8 weights for the dense and the expert layers.

Decoding on a CPU is bound by the bytes of weight read per token, so storing the weights narrower makes
it faster and makes bigger models fit: bf16 halves the bytes, int8 quarters them. Only the weights are
narrow; activations, norms, the router, the embedding and every accumulation stay fp32, and the C++
kernels (nanoseek.infer.fast, csrc/gemv.h) widen the weights in registers.

int8 is symmetric with one fp32 scale per output row and group of `group_size` inputs (the whole row when
the row does not split evenly): q = round(w / s) in [-127, 127], s = max|w| / 127 over the group.

`quantize_model(model, fmt)` swaps modules from outside, the way nanoseek.infer.fast.accelerate does:
every nn.Linear becomes a QuantLinear and every GroupedExperts a QuantExperts, except kv_b_proj (the
absorbed attention reads it as a matrix) and a head tied to the embedding. The model/ code is untouched;
nanoseek.load applies the transform before filling a quantized checkpoint (nanoseek.infer.quant_io).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import GroupedExperts

from .fast import kernels

FORMATS = ("int8", "bf16")
DEFAULT_GROUP = 128
KERNEL_ROWS = 32        # few-row matmuls up to this many rows take the kernel (measured against torch)
KERNEL_ASSIGNMENTS = 4096
NOT_QUANTIZED = ("kv_b_proj",)  # module names (last part) kept in the model dtype


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def groups_for(in_features: int, group_size: int) -> int:
    """Scale groups per row: in_features / group_size when that divides evenly, else 1 (per row)."""
    return in_features // group_size if group_size and in_features % group_size == 0 else 1


def quantize_int8(w: torch.Tensor, group_size: int = DEFAULT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scale fp32 [..., N, K / g]) with w ~ q * scale per group of g inputs."""
    *lead, N, K = w.shape
    G = groups_for(K, group_size)
    wg = w.float().reshape(*lead, N, G, K // G)
    scale = wg.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    q = (wg / scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(*lead, N, K), scale.contiguous()


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight a narrow one stands for."""
    if scale is None:
        return w.to(dtype)
    *lead, N, K = w.shape
    G = scale.shape[-1]
    return (w.reshape(*lead, N, G, K // G).to(torch.float32) * scale.unsqueeze(-1)).reshape(w.shape).to(dtype)


def narrow(w: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense weight in format fmt: (weight, scale or None)."""
    if check_format(fmt) == "bf16":
        return w.to(torch.bfloat16), None
    return quantize_int8(w, group_size)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _fast_inference(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and not torch.is_grad_enabled() and kernels.usable(x)


class QuantLinear(nn.Module):
    """y = x W^T with W stored as bf16, or int8 plus `weight_scale` [out, groups] (no bias: the model has none).

    Few rows (decoding) take the C++ kernel or torch's dequantize-and-F.linear, whichever measured faster
    for the shape (kernels.faster_path); many rows (prefill) and anything with autograd, torch's path.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int = DEFAULT_GROUP,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt)
        dtype = torch.int8 if fmt == "int8" else torch.bfloat16
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=dtype, device=device))
        if fmt == "int8":
            G = groups_for(in_features, group_size)
            self.weight_scale = _frozen(torch.empty(out_features, G, dtype=torch.float32, device=device))
        else:
            self.weight_scale = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, group_size: int = DEFAULT_GROUP) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, fmt, group_size, device=lin.weight.device)
        if lin.weight.device.type != "meta":
            w, s = narrow(lin.weight.detach(), fmt, group_size)
            q.weight.data = w
            if s is not None:
                q.weight_scale.data = s
        return q

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(x.dtype))

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        return kernels.rows_matmul(x2d, self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if 0 < rows <= KERNEL_ROWS and _fast_inference(x):
            key = (self.fmt, self.out_features, self.in_features, self.weight_scale is not None and
                   self.weight_scale.shape[1], kernels.row_bucket(rows))
            x2d = x.reshape(rows, self.in_features)
            y = kernels.faster_path(key, self._kernel, self._torch, x2d)
            return y.view(*x.shape[:-1], self.out_features)
        return self._torch(x)

    def extra_repr(self) -> str:
        groups = "" if self.weight_scale is None else f", groups={self.weight_scale.shape[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{groups}"


class QuantExperts(nn.Module):
    """GroupedExperts with bf16 or int8 stacked weights (`gate_up_proj` [E, 2F, D], `down_proj` [E, D, F],
    and for int8 `gate_up_proj_scale` [E, 2F, D / g], `down_proj_scale` [E, D, F / g]).

    The routed assignments go through kernels.experts_rows (each chosen expert's narrow weights read once);
    without the kernels (or with autograd), each used expert is dequantized in turn, so the dense copy of
    only one expert exists at a time.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: str, group_size: int = DEFAULT_GROUP,
                 device=None):
        super().__init__()
        self.n_experts, self.fmt = n_experts, check_format(fmt)
        dtype = torch.int8 if fmt == "int8" else torch.bfloat16
        E, D, Fh = n_experts, hidden, inter
        self.gate_up_proj = _frozen(torch.empty(E, 2 * Fh, D, dtype=dtype, device=device))
        self.down_proj = _frozen(torch.empty(E, D, Fh, dtype=dtype, device=device))
        if fmt == "int8":
            self.gate_up_proj_scale = _frozen(torch.empty(E, 2 * Fh, groups_for(D, group_size), device=device))
            self.down_proj_scale = _frozen(torch.empty(E, D, groups_for(Fh, group_size), device=device))
        else:
            self.gate_up_proj_scale = self.down_proj_scale = None

    @classmethod
    def from_experts(cls, ex: GroupedExperts, fmt: str, group_size: int = DEFAULT_GROUP) -> "QuantExperts":
        E, F2, D = ex.gate_up_proj.shape
        q = cls(E, D, F2 // 2, fmt, group_size, device=ex.gate_up_proj.device)
        if ex.gate_up_proj.device.type != "meta":
            for name in ("gate_up_proj", "down_proj"):
                w, s = narrow(getattr(ex, name).detach(), fmt, group_size)
                getattr(q, name).data = w
                if s is not None:
                    getattr(q, name + "_scale").data = s
        return q

    def routed_rows(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor | None:
        """The weighted expert outputs [N, D] straight from the routing (no sort), or None off the kernels."""
        if idx_NK.numel() > KERNEL_ASSIGNMENTS or not _fast_inference(x_ND):
            return None
        return kernels.experts_rows(x_ND, self.gate_up_proj, self.down_proj, idx_NK, w_NK,
                                    self.gate_up_proj_scale, self.down_proj_scale)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
        """GroupedExperts.forward's contract: x_MD holds the assignments sorted by expert (a CPU format: the
        counts are read here, and max_rows is not needed)."""
        M = x_MD.shape[0]
        if 0 < M <= KERNEL_ASSIGNMENTS and _fast_inference(x_MD):
            expert_M = torch.repeat_interleave(torch.arange(self.n_experts), counts_E, output_size=M)
            return kernels.experts_rows(x_MD, self.gate_up_proj, self.down_proj, expert_M.unsqueeze(1),
                                        torch.ones(M, 1), self.gate_up_proj_scale, self.down_proj_scale)
        out = x_MD.new_empty(M, self.down_proj.shape[1])
        start = 0
        # One expert at a time: a dense copy of every expert would be the fp32 model this format avoids.
        for e, n in enumerate(counts_E.tolist()):
            if n:
                w1 = dequantize(self.gate_up_proj[e], self._scale("gate_up_proj", e), x_MD.dtype)
                w2 = dequantize(self.down_proj[e], self._scale("down_proj", e), x_MD.dtype)
                g, u = F.linear(x_MD[start: start + n], w1).chunk(2, dim=-1)
                out[start: start + n] = F.linear(F.silu(g) * u, w2)
                start += n
        return out

    def _scale(self, name: str, e: int) -> torch.Tensor | None:
        s = getattr(self, name + "_scale")
        return None if s is None else s[e]


def quantize_model(model: nn.Module, fmt: str, group_size: int = DEFAULT_GROUP) -> nn.Module:
    """Swap in QuantLinear / QuantExperts, in place (weights quantized; on the meta device, empty ones
    of the right dtypes and shapes for a checkpoint to fill); returns the model."""
    check_format(fmt)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in NOT_QUANTIZED or (tied and name == "lm_head"):
                continue
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, QuantLinear.from_linear(child, fmt, group_size))
            elif isinstance(child, GroupedExperts):
                setattr(parent, name, QuantExperts.from_experts(child, fmt, group_size))
    model.weight_format = {"format": fmt, "group_size": group_size if fmt == "int8" else None}
    return model


def narrow_weight_names(model: nn.Module) -> set[str]:
    """The names of the bf16 / int8 weights (not their scales) of a quantized model."""
    names = set()
    for prefix, m in model.named_modules():
        dot = prefix + "." if prefix else ""
        if isinstance(m, QuantLinear):
            names.add(dot + "weight")
        elif isinstance(m, QuantExperts):
            names.update((dot + "gate_up_proj", dot + "down_proj"))
    return names


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
