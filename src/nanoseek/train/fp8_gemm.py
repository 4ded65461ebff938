"""The GEMM backends of fine-grained FP8 training (V3 report section 3.3), their shape guards and layouts.

Every GEMM of an FP8 linear (forward, dgrad, wgrad; nanoseek.train.fp8) has one form,

    out[z] = A[z] @ B[z]^T in FP32,  A [Z, M, K] in 1x128 tiles along K  (scales [Z, M, ceil(K/128)]),
                                     B [Z, N, K] in 128x128 blocks       (scales [Z, ceil(N/128), ceil(K/128)])
                                              or in 1x128 tiles along K  (scales [Z, N, ceil(K/128)]),

and arrives here already quantized (E4M3 values, float32 dequantization scales: x ~= q * scale), so every
backend multiplies exactly the same FP8 numbers:

  emulate    dequantize and multiply in FP32 (torch.bmm). The reference, and the path of CPUs.
  blockwise  the native block-scaled GEMMs: torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128
             for A and BlockWise128x128 (forward, dgrad) or BlockWise1x128 (wgrad) for B, FP32 output. These
             are cuBLASLt's DeepSeek-style kernels: the tensor cores' partial sums are promoted to FP32 and
             scaled once per 128-wide K block, the report's recipe. PyTorch offers them on SM90 (Hopper)
             only, with cuBLASLt >= 12.9, through the scaled_mm API that torch 2.10 introduced (2.11, the
             GPU machine's version, has it: torch/nn/functional.py defines scaled_mm, ScalingType). Its
             grouped sibling scaled_grouped_mm accepts only row-wise and MX/NV-FP4 scales, not these
             block recipes (aten/src/ATen/native/cuda/GroupedBlas.cpp), so the routed experts run one
             blockwise GEMM per expert on the padded [E, capacity, D] buffer.
  scaled_mm  other FP8 GPUs (SM89, SM100+): torch._scaled_mm per 128-wide K slice with row-wise scales,
             summed in FP32. The slice outputs are FP32 where the build accepts it (it does on CPU and via
             cuBLASLt on SM90) and BF16 otherwise (torch 2.11's CUTLASS row-wise kernel): then each slice
             is rounded to BF16 before the sum, a loss the blockwise kernels do not have. Opt-in only.

"auto" takes blockwise where it exists and emulates elsewhere.

Layouts the blockwise kernels check (aten/src/ATen/native/cuda/ScaledBlas.cpp, _scaled_block1x128_block128x128
and _scaled_block1x128_block1x128; test/test_scaled_matmul_cuda.py builds the same): mat_a [M, K] row-major,
mat_b [K, N] column-major (Hopper's cuBLASLt multiplies only row-major by column-major), K and N multiples of
16; a 1x128 scale is [rows, ceil(K/128)] with strides (1, rows) ("outer-dim-major"); a 128x128 scale of
mat_b is [L4, ceil(N/128)] with strides (1, L4), where L4 = ceil(K/128) rounded up to a multiple of 4
(cuBLASLt's 16-byte alignment of the scale rows; without it the results were silently wrong, pytorch PR
166752). Shape guards: the operands are zero-padded to K = 128 * ceil(K/128) (a whole last tile: padding
zeros changes neither a tile's max-abs nor any product) and M, N to multiples of 16, and the result is sliced
back, so odd shapes (tiny's kv_a_proj, N = 40; an expert capacity of 7) never reach a kernel check.

Agreement with the emulation (asserted by tests/test_gpu.py): both multiply the same FP8 values with the same
scales, so they differ only in how the 128 products of each K block are summed. The block partial sums are
exact-product sums over at most 128 terms; if the tensor cores keep p mantissa bits while accumulating (the
report measured about 14 on H800), each block sum is off by at most 128 * 2^-p of the sum of |products| in
the block, and the FP32 sum of the scaled block sums adds ceil(K/128) * 2^-24 of the same. Hence, per output
element, |out_blockwise - out_emulate| <= (128 * 2^-14 + ceil(K/128) * 2^-24) * (|A| @ |B|^T) with |A|, |B|
the dequantized operands: agreement_bound() below.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "emulate", "blockwise", "scaled_mm")
RECIPE_BLOCK = 128       # the only tile width the native block-scaled kernels take
PAD_MN = 16              # the kernels' divisibility of the outer dims (and 16-byte aligned 1x128 scales)
SCALE_ROWS_ALIGN = 4     # 128x128 scale rows padded to a multiple of 4 floats (16 bytes)
ACCUMULATOR_BITS = 14    # mantissa bits Hopper's FP8 tensor cores keep while accumulating (V3 report 3.3.2)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def agreement_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |blockwise - emulate| for out = a @ b^T (a [..., M, K], b [..., N, K] dequantized)."""
    K = a.shape[-1]
    rtol = RECIPE_BLOCK * 2.0 ** -ACCUMULATOR_BITS + -(-K // RECIPE_BLOCK) * 2.0 ** -24
    return rtol * (a.abs() @ b.abs().transpose(-2, -1))


# ----------------------------------------------------------------------------- backend choice
def blockwise_available(device: torch.device) -> str | None:
    """None when the native block-scaled GEMMs can run on `device`, else the reason they cannot."""
    if device.type != "cuda":
        return f"the blockwise FP8 kernels need a CUDA device, not {device.type}"
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (added in 2.10)"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"PyTorch runs the 1x128/128x128 FP8 kernels on SM90 (Hopper) only; this GPU is SM{major}{minor}"
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"the blockwise FP8 kernels need cuBLASLt >= 12.9; torch was built with CUDA {torch.version.cuda}"
    return None


def resolve(backend: str, block: int, device: torch.device) -> str:
    """The backend to run: `backend` itself, or for "auto" blockwise where possible and emulate elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta":
        return "emulate"  # shape/device propagation only (tests/test_device_guard.py)
    if backend == "auto":
        if block != RECIPE_BLOCK or blockwise_available(device) is not None:
            return "emulate"
        return "blockwise" if _blockwise_runs(device) else "emulate"
    if backend == "blockwise":
        why = blockwise_available(device)
        if block != RECIPE_BLOCK:
            why = f"the blockwise FP8 kernels use {RECIPE_BLOCK}-wide tiles; fp8.block is {block}"
        if why is not None:
            raise ValueError(f"fp8.backend=blockwise: {why} (use fp8.backend=auto or emulate)")
    return backend


@functools.lru_cache(maxsize=None)
def _blockwise_runs_on(device_index: int) -> bool:
    """One tiny blockwise GEMM per device: the capability checks cannot see a cuBLASLt that lacks the kernels."""
    dev = torch.device("cuda", device_index)
    q = torch.ones(16, RECIPE_BLOCK, device=dev).to(torch.float8_e4m3fn)
    try:
        blockwise_2d(q, torch.ones(16, 1, device=dev), q, torch.ones(1, 1, device=dev), b_blocks=True)
        return True
    except (RuntimeError, ValueError) as e:  # RuntimeError covers torch's unsupported-kernel errors too
        warnings.warn(f"FP8: the blockwise scaled_mm kernels failed on {dev} ({e}); emulating FP8 instead",
                      stacklevel=3)
        return False


def _blockwise_runs(device: torch.device) -> bool:
    return _blockwise_runs_on(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- the GEMM
def gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_blocks: bool,
         backend: str, block: int) -> torch.Tensor:
    """out[z] = A[z] @ B[z]^T in FP32 for quantized A [Z,M,K] (1x128 tiles) and B [Z,N,K] (128x128 blocks when
    b_blocks, else 1x128 tiles along K); `backend` as returned by resolve()."""
    if backend == "blockwise":
        return torch.stack([blockwise_2d(a_q[z], a_s[z], b_q[z], b_s[z], b_blocks) for z in range(a_q.shape[0])])
    if backend == "scaled_mm":
        b_cols = b_s.repeat_interleave(block, dim=1)[:, : b_q.shape[1]] if b_blocks else b_s  # [Z, N, K/b]
        return _scaled_mm_sliced(a_q, a_s, b_q, b_cols, block)
    a = dequantize_tiles(a_q, a_s, block)
    b = dequantize_blocks(b_q, b_s, block) if b_blocks else dequantize_tiles(b_q, b_s, block)
    return torch.bmm(a, b.transpose(1, 2))


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(block, dim=-1)[..., : q.shape[-1]]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    N, K = q.shape[-2:]
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :N, :K]
    return q.float() * s


# ----------------------------------------------------------------------------- blockwise: shapes and layouts
def _pad2(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """t [r, c] zero- (or value-) padded to [rows, cols], row-major contiguous (float8 included)."""
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = t.new_full((rows, cols), value) if value else t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _outer_dim_major(s: torch.Tensor) -> torch.Tensor:
    """The same [rows, L] values with strides (1, rows): a 1x128 scale as the kernels read it."""
    return s.t().contiguous().t()


def blockwise_operands(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                       b_blocks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mat_a, scale_a, mat_b, scale_b) for one F.scaled_mm computing A @ B^T, padded as the kernels need.

    a_q [M, K] with a_s [M, L]; b_q [N, K] with b_s [ceil(N/128), L] (b_blocks) or [N, L]; L = ceil(K/128).
    The product of the returned operands is [Mp, Np] with Mp, Np the 16-multiples above M, N; its [:M, :N]
    is A @ B^T. Padded scale entries are 1 (they multiply zeros, or are never read).
    """
    M, K = a_q.shape
    N, L = b_q.shape[0], a_s.shape[1]
    Mp, Np, Kp = round_up(M, PAD_MN), round_up(N, PAD_MN), L * RECIPE_BLOCK
    mat_a = _pad2(a_q, Mp, Kp)
    mat_b = _pad2(b_q, Np, Kp).t()  # [Kp, Np], column-major
    scale_a = _outer_dim_major(_pad2(a_s, Mp, L, 1.0))
    if b_blocks:
        # Np <= round_up(N, 128): padding N to 16 never adds a 128-row block, so the block grid is unchanged.
        scale_b = _pad2(b_s, b_s.shape[0], round_up(L, SCALE_ROWS_ALIGN), 1.0).t()  # [L4, N/128], strides (1, L4)
    else:
        scale_b = _outer_dim_major(_pad2(b_s, Np, L, 1.0))  # [Np, L], strides (1, Np)
    return mat_a, scale_a, mat_b, scale_b


def blockwise_2d(a_q, a_s, b_q, b_s, b_blocks: bool) -> torch.Tensor:
    """A @ B^T [M, N] in FP32 through one native block-scaled GEMM (shapes as in blockwise_operands)."""
    M, N = a_q.shape[0], b_q.shape[0]
    mat_a, scale_a, mat_b, scale_b = blockwise_operands(a_q, a_s, b_q, b_s, b_blocks)
    out = _native_scaled_mm(mat_a, mat_b, scale_a, "1x128", scale_b, "128x128" if b_blocks else "1x128")
    return out[:M, :N]


def _native_scaled_mm(mat_a, mat_b, scale_a, recipe_a: str, scale_b, recipe_b: str) -> torch.Tensor:
    """The kernel call itself (FP32 output, no fast accumulation: partial sums promoted to FP32).

    Kept as one small function: the CPU tests put a reference of the kernels' documented contract in its
    place (tests/test_fp8_gemm.py), so everything around the call runs on CPU too."""
    kind = {"1x128": F.ScalingType.BlockWise1x128, "128x128": F.ScalingType.BlockWise128x128}
    return F.scaled_mm(mat_a, mat_b, scale_a, kind[recipe_a], scale_b, kind[recipe_b],
                       output_dtype=torch.float32, use_fast_accum=False)


# ----------------------------------------------------------------------------- row-wise, K-sliced
@functools.lru_cache(maxsize=None)
def _rowwise_out_dtype(device_type: str, device_index: int | None) -> torch.dtype:
    """FP32 slice outputs where this build's row-wise kernel takes them, else BF16 (see the module docstring)."""
    dev = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    a = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                         out_dtype=torch.float32)
        return torch.float32
    except (RuntimeError, ValueError):
        return torch.bfloat16


def _scaled_mm_sliced(a_q, a_s, b_q, b_s, block: int) -> torch.Tensor:
    """torch._scaled_mm per (batch, K slice) with row-wise scales, summed in FP32. Slices are padded to a
    multiple of 16 wide, and M, N to multiples of 16, as the kernel requires."""
    Z, M, K = a_q.shape
    N = b_q.shape[1]
    Mp, Np = round_up(M, PAD_MN), round_up(N, PAD_MN)
    out_dtype = _rowwise_out_dtype(a_q.device.type, a_q.device.index)
    out = torch.zeros(Z, M, N, dtype=torch.float32, device=a_q.device)
    for z in range(Z):
        for j, k0 in enumerate(range(0, K, block)):
            k1 = min(K, k0 + block)
            kc = round_up(k1 - k0, PAD_MN)
            a = _pad2(a_q[z, :, k0:k1], Mp, kc)
            b = _pad2(b_q[z, :, k0:k1], Np, kc).t()  # column-major [kc, Np]
            sa = _pad2(a_s[z, :, j:j + 1], Mp, 1, 1.0)
            sb = _pad2(b_s[z, :, j][None, :], 1, Np, 1.0)
            out[z] += torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)[:M, :N].float()
    return out
