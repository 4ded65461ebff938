"""The module classes `accelerate` swaps in: the pure model's modules with CPU decode paths added.

Each is a subclass of the module it replaces, with the same parameters and state-dict names, and runs
its own path only at inference (eval mode, autograd off) on a CPU; anything else (training, grad
enabled, autocast, GPUs, FP8 wrappers, expert-parallel MoE, FSDP hooks) calls the pure module's forward,
so it computes exactly what the pure model computes.

Why these paths: decoding multiplies 1-16 rows by each weight, so its time is that of streaming the
weights from memory, and torch's CPU kernels are built for large batches (a single-threaded GEMV for one
row, a weight re-pack for a few, and a few hundred small ops per step issued from Python, each with its
own overhead). benchmarks/bench_kernels.py measures each path against the torch one it replaces.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.attention import MLA
from nanoseek.model.layers import RMSNorm
from nanoseek.model.moe import GroupedExperts, MoE
from nanoseek.model.transformer import Block, MTPModule, Transformer

from . import kernels

KERNEL_ROWS = 32            # few-row matmuls up to this many rows go through kernels.rows_matmul
RELAYOUT_MIN = 1 << 16      # without the kernels, weights this small keep F.linear (call overhead dominates)
GEMV_SPLIT = 4              # one row, no kernels: the weight's rows split into this many batches of one bmm
FEW_ASSIGNMENTS = 32        # no kernels: up to this many (token, expert) pairs run one GEMV pair each
KERNEL_ASSIGNMENTS = 4096   # up to this many run kernels.experts_rows (and a decode step the C++ block)


def inference(module: nn.Module, x: torch.Tensor) -> bool:
    """The fast paths apply: eval mode, autograd and autocast off, on the CPU."""
    return not module.training and x.is_cpu and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for the few-row shapes of CPU decoding, laid out for the memory-bound work they are.

    In order of preference: up to KERNEL_ROWS rows in fp32, the C++ kernel; without it, one row as a bmm
    over GEMV_SPLIT slices of the weight (which uses every thread), and 2-64 rows as W @ x^T (which streams
    W once); small weights and everything else, F.linear.
    """
    n_out, n_in = weight.shape
    rows = x.numel() // n_in if n_in else 0
    if rows == 0:
        return F.linear(x, weight)
    if rows <= KERNEL_ROWS and weight.is_contiguous() and kernels.usable(x, weight):
        # The kernel, unless torch's F.linear measured faster at this shape on this machine (oneDNN/MKL
        # can be, e.g. on CPUs with wide vectors and high bandwidth per core).
        key = ("fp32", n_out, n_in, 0, kernels.row_bucket(rows))
        y = kernels.faster_path(key, kernels.rows_matmul, F.linear, x.reshape(rows, n_in), weight)
        return y.view(x.shape[:-1] + (n_out,))
    if weight.numel() < RELAYOUT_MIN:
        return F.linear(x, weight)
    if rows == 1 and torch.get_num_threads() > 1 and n_out % GEMV_SPLIT == 0 and weight.is_contiguous():
        y = torch.bmm(x.reshape(1, 1, n_in).expand(GEMV_SPLIT, 1, n_in),
                      weight.view(GEMV_SPLIT, n_out // GEMV_SPLIT, n_in).transpose(1, 2))
        return y.view(x.shape[:-1] + (n_out,))
    if 2 <= rows <= 64:
        return torch.mm(weight, x.reshape(rows, n_in).t()).t().contiguous().view(x.shape[:-1] + (n_out,))
    return F.linear(x, weight)


class FastLinear(nn.Linear):
    pure = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and inference(self, x):
            return few_rows_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class FastRMSNorm(RMSNorm):
    pure = RMSNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference(self, x) and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if kernels.usable(x, self.weight):
                return kernels.rms_norm(x, self.weight, self.eps)  # one C++ loop
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the weight fused into the op
        return super().forward(x)


class FastExperts(GroupedExperts):
    pure = GroupedExperts

    def use_grouped_mm(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> bool:
        # fp32 inference on a CPU: one padded batched GEMM beats grouped_mm for mid-sized batches;
        # grouped_mm keeps one row per expert (it then reads only the chosen experts' weights). Reading the
        # counts costs nothing on a CPU.
        if (x_MD.dtype == torch.float32 and not self.training and not torch.is_grad_enabled()
                and self.gate_up_proj.is_cpu and not torch.is_autocast_enabled("cpu") and int(counts_E.max()) > 1):
            return False
        return super().use_grouped_mm(x_MD, counts_E)


def forward_few(experts: GroupedExperts, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
    """Weighted expert output [N, D] for a handful of tokens: one GEMV pair per (token, expert) assignment.

    With N*K small, the sort / gather / grouped-GEMM machinery costs more than the arithmetic. Each
    assignment reads its expert's weights in place; nothing is copied. The loop is over the N*K chosen
    pairs, so its length does not depend on the number of experts.
    """
    w1, w2 = experts.gate_up_proj, experts.down_proj
    N, K = idx_NK.shape
    pairs = [(n, e) for n, row in enumerate(idx_NK.tolist()) for e in row]
    h = torch.cat([few_rows_linear(x_ND[n: n + 1], w1[e]) for n, e in pairs])  # [N*K, 2F]
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    y_NKD = torch.cat([few_rows_linear(a[i: i + 1], w2[e]) for i, (_, e) in enumerate(pairs)]).view(N, K, -1)
    return torch.bmm(w_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1)


class FastMoE(MoE):
    pure = MoE

    def routed_experts(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        if hasattr(ex, "routed_rows") and inference(self, x_ND):  # bf16 / int8 experts (nanoseek.infer.quant)
            y = ex.routed_rows(x_ND, w_NK, idx_NK)
            if y is not None:
                return y
        if inference(self, x_ND) and type(ex) in (FastExperts, GroupedExperts) and x_ND.dtype == ex.gate_up_proj.dtype:
            n = idx_NK.numel()
            if n <= KERNEL_ASSIGNMENTS and kernels.usable(x_ND, ex.gate_up_proj, ex.down_proj):
                return kernels.experts_rows(x_ND, ex.gate_up_proj, ex.down_proj, idx_NK, w_NK)
            if n <= FEW_ASSIGNMENTS:
                return forward_few(ex, x_ND, w_NK, idx_NK).to(x_ND.dtype)
        return super().routed_experts(x_ND, w_NK, idx_NK)


FP32 = (torch.float32,)
NARROW = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)  # what a QuantLinear / QuantExperts may hold


class _KernelPlan:
    """What kernels.block_decode needs from one block, gathered once: its BlockConfig, and for each
    BlockWeights field the (tensor dict, name) to read it from and the dtypes it may have. The tensors are
    looked up at every call and the BlockWeights rebuilt when one was replaced (a reload, a cast to another
    dtype, ...); `current()` says whether the block still holds the modules the plan was made from (a
    module swapped in since, e.g. by quantize_model, needs a new plan).

    A projection or expert stack of nanoseek.infer.quant (QuantLinear / QuantExperts) is read as it is
    stored: bf16, or int8 / packed int4 with its `<field>_scale`; everything else must be fp32."""

    def __init__(self, block: Block):
        from nanoseek.infer.quant import QuantExperts, QuantLinear  # here: quant imports this package

        a, mlp, cfg = block.self_attn, block.mlp, block.self_attn.cfg
        # field -> (parent module, child name, tensor name); the child is the module holding the tensor
        fields = {"input_layernorm": (block, "input_layernorm", "weight"),
                  "post_attention_layernorm": (block, "post_attention_layernorm", "weight"),
                  "kv_a_proj_with_mqa": (a, "kv_a_proj_with_mqa", "weight"),
                  "kv_a_layernorm": (a, "kv_a_layernorm", "weight"),
                  "kv_b_proj": (a, "kv_b_proj", "weight"), "o_proj": (a, "o_proj", "weight")}
        if cfg.q_lora_rank is None:
            fields["q_proj"] = (a, "q_proj", "weight")
        else:
            fields.update(q_a_proj=(a, "q_a_proj", "weight"), q_a_layernorm=(a, "q_a_layernorm", "weight"),
                          q_b_proj=(a, "q_b_proj", "weight"))
        moe = isinstance(mlp, MoE)
        containers = [(block, "self_attn"), (block, "mlp")]
        if moe:
            fields.update(router_weight=(mlp, "gate", "weight"),
                          e_score_correction_bias=(mlp, "gate", "e_score_correction_bias"),
                          experts_gate_up_proj=(mlp, "experts", "gate_up_proj"),
                          experts_down_proj=(mlp, "experts", "down_proj"))
            if mlp.shared_experts is not None:
                sh = mlp.shared_experts
                containers.append((mlp, "shared_experts"))
                fields.update(shared_gate_proj=(sh, "gate_proj", "weight"), shared_up_proj=(sh, "up_proj", "weight"),
                              shared_down_proj=(sh, "down_proj", "weight"))
        else:
            fields.update(gate_proj=(mlp, "gate_proj", "weight"), up_proj=(mlp, "up_proj", "weight"),
                          down_proj=(mlp, "down_proj", "weight"))
        # each BlockWeights field: its name, the dict holding its tensor (_parameters or _buffers) and key, and
        # the dtypes it may have. These and the lists below are what the checks walk with map() and list
        # equality, in C: a decode step makes them once per block, its caches cold from the weights it
        # streams, so each Python-level step counts.
        self.names, self._dicts, self._keys, self.dtypes = [], [], [], []
        for field, (parent, child, tensor) in fields.items():
            m = parent._modules[child]
            quantized = isinstance(m, (QuantLinear, QuantExperts)) and field != "kv_b_proj"
            own = [(field, tensor, NARROW if quantized else FP32), (field + "_scale", tensor + "_scale", FP32)]
            for name, t, dtypes in own:
                if t in m._parameters or t in m._buffers:  # a scale only where the format has one
                    self.names.append(name)
                    self._dicts.append(m._parameters if t in m._parameters else m._buffers)
                    self._keys.append(t)
                    self.dtypes.append(dtypes)
        # every (parent, child name) link the tensors were found through, and the child then: current()
        links = list(dict.fromkeys(containers + [(p, c) for p, c, _ in fields.values()]))
        self._children = [p._modules for p, _ in links]
        self._child_names = [c for _, c in links]
        self._child_modules = [p._modules[c] for p, c in links]
        self.modules = [block] + self._child_modules
        self.linear_types = (FastLinear, nn.Linear, QuantLinear)
        self.experts_types = (FastExperts, GroupedExperts, QuantExperts)
        self.linears = [m for m in self.modules if isinstance(m, (nn.Linear, QuantLinear))]
        self.norms = [m for m in self.modules if isinstance(m, RMSNorm)]
        self.moe = mlp if moe else None
        self.attention, self.n_heads = a, a.n_heads
        self.assignments_per_token = max(1, cfg.num_experts_per_tok)
        self._hook_dicts = [d for m in self.modules for d in (m._forward_pre_hooks, m._forward_hooks)]
        self._plain_types = None  # the modules' types when plain() last held
        self._dtypes_ok = None  # the tensors' dtypes when they were last found acceptable
        # the extension whose classes the config and weights are: a switch of NANOSEEK_KERNEL_ISA makes a new plan
        self.extension = kernels.load()
        self.config = kernels.block_config(
            hidden_size=cfg.hidden_size, num_attention_heads=a.n_heads, qk_nope_head_dim=a.nope,
            qk_rope_head_dim=a.rope, v_head_dim=a.v_dim, kv_lora_rank=a.kv_rank, q_lora_rank=cfg.q_lora_rank or 0,
            rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.rms_norm_eps, softmax_scale=a.scale, moe=moe,
            num_experts_per_tok=cfg.num_experts_per_tok if moe else 0, n_group=cfg.n_group,
            topk_group=cfg.topk_group, scoring_func=cfg.scoring_func, topk_method=cfg.topk_method,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
        self._impls: list = []
        self._weights = None

    def __reduce__(self):
        # A plan is a cache of C++ objects: a deep copy or a pickle of the model builds its own when it runs.
        return _no_plan, ()

    def current(self) -> bool:
        """The block still holds the modules this plan reads (none replaced since it was made)."""
        return list(map(dict.get, self._children, self._child_names)) == self._child_modules  # `is` per item

    def plain(self) -> bool:
        """The block is still made of the modules accelerate (or quantize_model) put there, and nothing
        wrapped them or hooked into them since."""
        if any(self._hook_dicts):
            return False
        types = list(map(type, self.modules))
        if types == self._plain_types:
            return True
        if type(self.attention) is not MLA:
            return False
        moe = self.moe
        if moe is not None and (type(moe) not in (FastMoE, MoE) or type(moe.experts) not in self.experts_types):
            return False
        if all(type(m) in self.linear_types for m in self.linears) and \
                all(type(m) in (FastRMSNorm, RMSNorm) for m in self.norms):
            self._plain_types = types
            return True
        return False

    def tensors(self) -> list:
        """The block's current tensors in `names` order (None where one was deleted)."""
        return list(map(dict.get, self._dicts, self._keys))

    def weights(self):
        """The BlockWeights of the current tensors, or None if one is off the CPU or of a dtype the C++
        block does not take there (fp32 everywhere; bf16 / int8 / uint8 int4 in quantized modules)."""
        tensors = self.tensors()
        # The C++ tensors behind the parameters (a reload or torch.utils.swap_tensors replaces them; an
        # assignment to .data keeps them but may change the dtype or device).
        try:
            impls = list(map(_CDATA, tensors))
        except AttributeError:  # a tensor set to None
            return None
        dtypes = list(map(_DTYPE, tensors))
        if impls == self._impls and dtypes == self._dtypes_ok and all(map(_IS_CPU, tensors)):
            return self._weights
        if not all(t.is_cpu and dt in ok for t, dt, ok in zip(tensors, dtypes, self.dtypes)):
            return None
        self._impls, self._dtypes_ok = impls, dtypes  # the BlockWeights keeps these tensors alive
        self._weights = kernels.block_weights(**dict(zip(self.names, tensors)))
        return self._weights


_CDATA, _DTYPE, _IS_CPU = (operator.attrgetter(a) for a in ("_cdata", "dtype", "is_cpu"))


def _no_plan():
    return None


def block_call(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, cache, layer: int) -> tuple | None:
    """The arguments after (x, cos, sin) of the kernels.block_decode call that is `block`'s decode step on
    `cache` (kv_layer, index, weights, config), or None where the block must run in Python (not plain, not
    dense MLA, too many assignments, weights or cache the C++ block does not take). For a step that
    decodes_in_kernel allows (so the kernels are built)."""
    kernel_cache = getattr(cache, "kernel_cache", None)  # the paged cache's; the reference cache has none
    if kernel_cache is None:
        return None
    plan = block.__dict__.get("_kernel_plan")
    if plan is None or plan.extension is not kernels.load() or not plan.current():
        if type(block.self_attn) is not MLA:  # the C++ block is dense MLA (V3.2's SparseMLA runs in torch)
            return None
        plan = block.__dict__["_kernel_plan"] = _KernelPlan(block)  # built once (again if a part was replaced)
    if x.shape[0] * x.shape[1] * plan.assignments_per_token > KERNEL_ASSIGNMENTS or not plan.plain():
        return None
    weights = plan.weights()
    where = kernel_cache(layer, plan.n_heads) if weights is not None else None
    return None if where is None else (*where, weights, plan.config)


def decodes_in_kernel(cache, x: torch.Tensor, cos: torch.Tensor) -> bool:
    """A step on `cache` may run blocks as kernels.block_decode calls: a decode step (not a prefill) at
    inference, fp32 on the CPU with the kernels built, not inside `kernels.op_by_op()`."""
    return (cache is not None and not cache.prefill and kernels.whole_blocks() and not torch.is_grad_enabled()
            and kernels.usable(x, cos))


class _DecodeInKernel:
    """A decode step of the block (cache attached, not a prefill) as one kernels.block_decode call: the
    same operations in the same order as Block.forward, without a Python call per op."""

    def forward(self, x, cos, sin, cache=None, layer: int = 0, aux_alpha: float = 0.0):
        if not self.training and decodes_in_kernel(cache, x, cos):
            call = block_call(self, x, cos, cache, layer)
            if call is not None:
                return kernels.block_decode(x, cos, sin, *call), None
        return super().forward(x, cos, sin, cache, layer, aux_alpha)


class FastBlock(_DecodeInKernel, Block):
    pure = Block


class FastMTPModule(_DecodeInKernel, MTPModule):
    pure = MTPModule


class FastTransformer(Transformer):
    """A decode step runs its blocks back to back as kernels.block_decode calls, with the checks of all of
    them made before the first: the Python between two blocks runs with the caches cold from the weights
    the block before streamed, so each block's module call and checks cost several times what they cost
    warm. Anything else (a prefill, a block that must run in Python, training) is Transformer's own."""

    pure = Transformer

    def run_blocks(self, x, cos, sin, cache):
        if not self.training and decodes_in_kernel(cache, x, cos):  # each block's plan checks its hooks and parts
            calls = [block_call(b, x, cos, cache, i) if isinstance(b, _DecodeInKernel) else None
                     for i, b in enumerate(self.layers)]
            if None not in calls:
                for call in calls:
                    x = kernels.block_decode(x, cos, sin, *call)
                return x
        return super().run_blocks(x, cos, sin, cache)


# pure class -> fast class, in the order accelerate applies them
SWAPS: dict[type, type] = {nn.Linear: FastLinear, RMSNorm: FastRMSNorm, GroupedExperts: FastExperts, MoE: FastMoE,
                           Block: FastBlock, MTPModule: FastMTPModule,
                           Transformer: FastTransformer}
