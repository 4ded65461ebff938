"""Weight-only quantized decoding: bf16, int8 and int4 weights for the dense and the expert layers.

Decoding on a CPU is bound by the bytes of weight read per token, so storing the weights narrower makes
it faster and makes bigger models fit: bf16 halves the bytes, int8 quarters them, int4 (with its scales)
takes 5/32 of them at groups of 32. Only the weights are narrow; activations, norms, the router, the
embedding and every accumulation stay fp32, and the C++ kernels (nanoseek.infer.fast, csrc/gemv.h) widen
the weights in registers.

int8 and int4 are symmetric with one fp32 scale per output row and group of `group_size` inputs (the
whole row when the row does not split evenly; default 128 for int8, 32 for int4): q = round(w / s) with
s = max|w| / 127 and q in [-127, 127] (int8), or s = max|w| / 7 and q in [-7, 7] (int4: -8 is never
written, so the format stays symmetric and |w - q s| <= s / 2 holds for every weight). int4 weights are
packed two to a byte in a uint8 tensor [..., rows, inputs / 2]: input 2j in the low nibble of byte j,
2j + 1 in the high one, each a two's complement 4-bit number (pack_int4 / unpack_int4). It needs an even
number of inputs per row and per group.

`quantize_model(model, fmt)` swaps modules from outside, the way nanoseek.infer.fast.accelerate does:
every nn.Linear becomes a QuantLinear and every GroupedExperts a QuantExperts, except kv_b_proj (the
absorbed attention reads it as a matrix) and a head tied to the embedding. The model/ code is untouched;
nanoseek.load applies the transform before filling a quantized checkpoint (nanoseek.infer.quant_io).
A decode step of an accelerated quantized model runs each block as one C++ call (kernels.block_decode,
reading these modules' tensors as stored; nanoseek.infer.fast.modules._KernelPlan), as for fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import GroupedExperts

from .fast import kernels

FORMATS = ("int8", "int4", "bf16")
DEFAULT_GROUPS = {"int8": 128, "int4": 32}  # inputs per scale when none is given
SCALED = ("int8", "int4")  # the formats with scales
STORAGE = {"int8": torch.int8, "int4": torch.uint8, "bf16": torch.bfloat16}  # the dtype each is kept in
INT_MAX = {"int8": 127, "int4": 7}
KERNEL_ROWS = 32        # few-row matmuls up to this many rows take the kernel (measured against torch)
PREFILL_KERNEL_ROWS = 256  # and up to this many (a prefill) int8 / int4 ones too, where measured faster
KERNEL_ASSIGNMENTS = 4096
NOT_QUANTIZED = ("kv_b_proj",)  # module names (last part) kept in the model dtype


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def default_group(fmt: str) -> int | None:
    """The group size a format takes when none is given (None for bf16: no scales)."""
    return DEFAULT_GROUPS.get(check_format(fmt))


def format_of(dtype: torch.dtype) -> str | None:
    """The scaled format stored in this dtype (int8 | int4), else None."""
    return {torch.int8: "int8", torch.uint8: "int4"}.get(dtype)


def stored_columns(fmt: str, in_features: int) -> int:
    """The last dimension of a weight with rows of in_features inputs (int4: two per byte; odd: an error)."""
    if fmt == "int4" and in_features % 2:
        raise ValueError(f"int4 packs two inputs per byte: a row of {in_features} inputs (odd) cannot be int4; "
                         "use int8")
    return in_features // 2 if fmt == "int4" else in_features


def groups_for(in_features: int, group_size: int) -> int:
    """Scale groups per row: in_features / group_size when that divides evenly, else 1 (per row)."""
    return in_features // group_size if group_size and in_features % group_size == 0 else 1


def scale_groups(fmt: str, in_features: int, group_size: int) -> int:
    """groups_for, checked for the format: an int4 group must start on a byte (an even group size)."""
    G = groups_for(in_features, group_size)
    if fmt == "int4" and (in_features // G) % 2:
        raise ValueError(f"int4 groups must be an even number of inputs so each starts on a byte, got "
                         f"{in_features // G}")
    return G


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [..., N, K] int8, or [..., N, K / 2] uint8 packed int4; scale fp32 [..., N, K / g]) with
    w ~ q * scale per group of g inputs (the whole row when g does not divide K; g = 0: per row; None:
    the format's default)."""
    *lead, N, K = w.shape
    stored_columns(fmt, K)
    G = scale_groups(fmt, K, default_group(fmt) if group_size is None else group_size)
    top = INT_MAX[fmt]
    wg = w.float().reshape(*lead, N, G, K // G)
    scale = wg.abs().amax(-1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    q = (wg / scale.unsqueeze(-1)).round_().clamp_(-top, top).to(torch.int8).reshape(*lead, N, K)
    return (pack_int4(q) if fmt == "int4" else q), scale.contiguous()


def quantize_int8(w: torch.Tensor, group_size: int = DEFAULT_GROUPS["int8"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scale fp32 [..., N, K / g]) with w ~ q * scale per group of g inputs."""
    return quantize(w, "int8", group_size)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUPS["int4"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [..., N, K / 2] packed int4, scale fp32 [..., N, K / g]) with w ~ q * scale per group."""
    return quantize(w, "int4", group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., K] (K even) -> uint8 [..., K / 2]: q[2j] in the low nibble of byte j."""
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2] -> int8 [..., K], the inverse of pack_int4."""
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2).to(torch.int8)
    return (nib ^ 8) - 8  # two's complement: 8..15 stand for -8..-1


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight a narrow one stands for."""
    if scale is None:
        return w.to(dtype)
    if w.dtype == torch.uint8:
        w = unpack_int4(w)
    *lead, N, K = w.shape
    G = scale.shape[-1]
    return (w.reshape(*lead, N, G, K // G).to(torch.float32) * scale.unsqueeze(-1)).reshape(w.shape).to(dtype)


def narrow(w: torch.Tensor, fmt: str, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense weight in format fmt: (weight, scale or None)."""
    if check_format(fmt) == "bf16":
        return w.to(torch.bfloat16), None
    return quantize(w, fmt, group_size)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _narrow_param(shape: tuple[int, ...], fmt: str, device) -> nn.Parameter:
    """An empty weight of dense shape [..., rows, inputs] as format fmt stores it."""
    *lead, K = shape
    return _frozen(torch.empty(*lead, stored_columns(fmt, K), dtype=STORAGE[fmt], device=device))


def _scale_param(shape: tuple[int, ...], fmt: str, group_size: int | None, device) -> nn.Parameter | None:
    """The empty fp32 scales [..., rows, groups] of a weight of dense shape [..., rows, inputs], or None."""
    if fmt not in SCALED:
        return None
    *lead, K = shape
    G = scale_groups(fmt, K, default_group(fmt) if group_size is None else group_size)
    return _frozen(torch.empty(*lead, G, dtype=torch.float32, device=device))


def _fast_inference(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and not torch.is_grad_enabled() and kernels.usable(x)


class QuantLinear(nn.Module):
    """y = x W^T with W stored as bf16, or int8 / packed int4 plus `weight_scale` [out, groups] (no bias: the
    model has none).

    Few rows (decoding) take the C++ kernel or torch's dequantize-and-F.linear, whichever measured faster
    for the shape (kernels.faster_path); so do int8 / int4 weights at up to PREFILL_KERNEL_ROWS rows (a
    short prefill: the dense copy the torch path makes of every weight costs about as much as its GEMM,
    and with int8 activations the kernel is often the faster one). More rows and anything with autograd:
    torch's path.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt)
        self.weight = _narrow_param((out_features, in_features), fmt, device)
        self.weight_scale = _scale_param((out_features, in_features), fmt, group_size, device)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, group_size: int | None = None) -> "QuantLinear":
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
        limit = KERNEL_ROWS if self.weight_scale is None else PREFILL_KERNEL_ROWS
        if 0 < rows <= limit and _fast_inference(x):
            # measured per mode: int8 activations change the kernel's speed (and only int8 / int4 take them)
            a8 = self.weight_scale is not None and kernels.int8_activations()
            key = (self.fmt, self.out_features, self.in_features, self.weight_scale is not None and
                   self.weight_scale.shape[1], kernels.row_bucket(rows)) + (("a8",) if a8 else ())
            x2d = x.reshape(rows, self.in_features)
            y = kernels.faster_path(key, self._kernel, self._torch, x2d)
            return y.view(*x.shape[:-1], self.out_features)
        return self._torch(x)

    def extra_repr(self) -> str:
        groups = "" if self.weight_scale is None else f", groups={self.weight_scale.shape[1]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{groups}"


class QuantExperts(nn.Module):
    """GroupedExperts with bf16, int8 or int4 stacked weights (`gate_up_proj` [E, 2F, D], `down_proj`
    [E, D, F], int4 packed to half the last dimension; for int8 and int4 `gate_up_proj_scale` [E, 2F, D / g],
    `down_proj_scale` [E, D, F / g]).

    The routed assignments go through kernels.experts_rows (each chosen expert's narrow weights read once);
    without the kernels (or with autograd), each used expert is dequantized in turn, so the dense copy of
    only one expert exists at a time.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, fmt: str, group_size: int | None = None,
                 device=None):
        super().__init__()
        self.n_experts, self.fmt = n_experts, check_format(fmt)
        shapes = {"gate_up_proj": (n_experts, 2 * inter, hidden), "down_proj": (n_experts, hidden, inter)}
        for name, shape in shapes.items():
            setattr(self, name, _narrow_param(shape, fmt, device))
            setattr(self, name + "_scale", _scale_param(shape, fmt, group_size, device))

    @classmethod
    def from_experts(cls, ex: GroupedExperts, fmt: str, group_size: int | None = None) -> "QuantExperts":
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


def quantize_model(model: nn.Module, fmt: str, group_size: int | None = None) -> nn.Module:
    """Swap in QuantLinear / QuantExperts, in place (weights quantized; on the meta device, empty ones
    of the right dtypes and shapes for a checkpoint to fill); returns the model. group_size None: the
    format's default (DEFAULT_GROUPS); 0: one scale per output row. A layer the format cannot hold (int4
    and an odd number of inputs) is a ValueError naming it."""
    check_format(fmt)
    group_size = default_group(fmt) if group_size is None else group_size
    if group_size is not None and group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0: one scale per row), got {group_size}")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in NOT_QUANTIZED or (tied and name == "lm_head"):
                continue
            try:
                if isinstance(child, nn.Linear) and child.bias is None:
                    setattr(parent, name, QuantLinear.from_linear(child, fmt, group_size))
                elif isinstance(child, GroupedExperts):
                    setattr(parent, name, QuantExperts.from_experts(child, fmt, group_size))
            except ValueError as e:
                raise ValueError(f"{prefix + '.' if prefix else ''}{name}: {e}") from None
    model.weight_format = {"format": fmt, "group_size": group_size if fmt in SCALED else None}
    return model


def narrow_weight_names(model: nn.Module) -> set[str]:
    """The names of the bf16 / int8 / int4 weights (not their scales) of a quantized model."""
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
