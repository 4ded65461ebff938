"""The whole-block C++ decode step (kernels.block_decode) on bf16, int8 and int4 weights.

A quantized model's decode step runs each block as one C++ call, reading the QuantLinear / QuantExperts
tensors as stored; these tests hold it to the module-by-module Python path of the same model
(kernels.op_by_op) for every format, a mix of formats in one block and across blocks, dense-MLP and MoE
blocks, q_lora and a plain q_proj, with and without shared experts, at one row, a few and more rows than
the few-row kernels take; for every instruction set this CPU runs plus the portable build; greedy tokens of
the engine; and the one-line errors of a malformed quantized BlockWeights.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import built  # noqa: F401 (a fixture)
from test_quant import ext  # noqa: F401 (a fixture)

import nanoseek
from nanoseek.config import preset
from nanoseek.infer import fast, quant
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.fast import kernels, modules
from nanoseek.model import Transformer
from nanoseek.model.transformer import Block

VARIANTS = {
    "moe-q_lora-shared": {},
    "moe-q_proj-no_shared": {"q_lora_rank": None, "n_shared_experts": 0, "rope_interleave": False},
    "dense_mlp-then-moe": {"first_k_dense_replace": 2},
}
FORMATS = ["bf16", "int8", "int8-row", "int4", "mixed"]


def quantized(fmt: str, **overrides) -> Transformer:
    """The accelerated tiny model in `fmt` ("fp32": not quantized); "mixed": layer 0 stays fp32, then int8
    attention, int4 routed experts, bf16 shared experts / dense MLP in layer 1, and int4 attention with int8
    (per-row) experts in layer 2."""
    torch.manual_seed(0)
    cfg = preset("tiny", initializer_range=0.1, hidden_size=128, moe_intermediate_size=64, **overrides)
    model = Transformer(cfg).eval()
    if fmt == "mixed":
        one, two = model.layers[1], model.layers[2]
        quant.quantize_model(one.self_attn, "int8", 32)
        if getattr(one.mlp, "shared_experts", None) is not None:
            quant.quantize_model(one.mlp.shared_experts, "bf16")
        quant.quantize_model(one.mlp, "int4" if hasattr(one.mlp, "experts") else "bf16", 32)
        quant.quantize_model(two.self_attn, "int4", 32)
        quant.quantize_model(two.mlp, "int8", 0)
    elif fmt != "fp32":
        kind, _, row = fmt.partition("-")
        quant.quantize_model(model, kind, 0 if row else 32)
    return fast.accelerate(model)


def decode_steps(model, paged_rows, seed: int = 0) -> list[torch.Tensor]:
    """Logits of a prefill's follow-up steps on 3 rows: one token each, two (a verify), 12 (36 rows: past
    the few-row kernels), one token at batch 1, and the MTP head's step."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=g)
    _, view = paged_rows(model, 3, 32)
    rows = torch.tensor([2, 0, 1])
    with torch.inference_mode():
        model.forward_cached(ids[:, :8], view(rows, torch.zeros(3, dtype=torch.long), 8))
        step, h = model.forward_cached(ids[:, 8:9], view(rows, torch.full((3,), 8), 1))
        verify, _ = model.forward_cached(ids[:, 9:11], view(rows, torch.full((3,), 9), 2))
        many, _ = model.forward_cached(ids[:, 11:23], view(rows, torch.full((3,), 11), 12))
        one, _ = model.forward_cached(ids[:1, 23:24], view(rows[:1], torch.full((1,), 23), 1))
        mtp, _ = model.mtp_forward_cached(h, ids[:, 9:10], view(rows, torch.full((3,), 9), 1))
    return [step, verify, many, one, mtp]


def count_blocks(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(kernels, "block_decode", lambda *a, f=kernels.block_decode: calls.append(1) or f(*a))
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_blocks_in_cpp_equal_the_python_path(built, fmt, variant, monkeypatch, paged_rows):  # noqa: F811
    model = quantized(fmt, **VARIANTS[variant])
    assert quant.is_quantized(model)
    calls = count_blocks(monkeypatch)
    got = decode_steps(model, paged_rows)
    assert len(calls) == 4 * model.config.num_hidden_layers + 1  # every block of four steps, and the MTP one
    calls.clear()
    with kernels.op_by_op():
        ref = decode_steps(model, paged_rows)
    assert not calls
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_quantized_block_follows_a_module_swapped_after_its_first_step(built, monkeypatch, paged_rows):  # noqa: F811
    """quantize_model on a model that already decoded: the block's plan is rebuilt from the new modules
    (reading the replaced fp32 ones would decode the old weights)."""
    model = quantized("fp32")
    decode_steps(model, paged_rows)
    plan = model.layers[1]._kernel_plan
    quant.quantize_model(model.layers[1].self_attn, "int4", 32)
    quant.quantize_model(model.layers[2], "int8", 32)
    assert not plan.current()
    calls = count_blocks(monkeypatch)
    got = decode_steps(model, paged_rows)
    assert calls and model.layers[1]._kernel_plan is not plan
    assert model.layers[1]._kernel_plan.weights().q_a_proj.dtype == torch.uint8
    with kernels.op_by_op():
        ref = decode_steps(model, paged_rows)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "mixed"])
def test_greedy_tokens_equal_with_and_without_the_cpp_block(built, fmt, monkeypatch):  # noqa: F811
    model = quantized(fmt)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    calls = count_blocks(monkeypatch)
    on = nanoseek.generate(model, prompts, max_new_tokens=12)
    assert calls
    with kernels.op_by_op():
        off = nanoseek.generate(model, prompts, max_new_tokens=12)
    assert on == off and all(len(t) == 12 for t in on)


def block_inputs(model, layer: int, module=None):
    """(block, args of module.block_decode, view) for one decode step of 2 rows through `module`'s own
    classes (an extension of another instruction set does not take the default one's objects)."""
    module = module or kernels.load()
    block = model.layers[layer]
    plan = modules._KernelPlan(block)
    cache = PagedCache.for_model(model, 8, 4, torch.float32, "cpu")
    view = cache.view([[6, 2], [1, 7, 0]], torch.tensor([5, 3]), 1)
    kv, index = view.kernel_cache(layer, block.self_attn.n_heads)
    weights = module.BlockWeights()
    for name, tensor in zip(plan.names, plan.tensors()):
        setattr(weights, name, tensor)
    config = module.BlockConfig()
    for name in dir(plan.config):
        if not name.startswith("_") and name != "check":
            setattr(config, name, getattr(plan.config, name))
    index = module.CacheIndex(block_table=index.block_table, write_rows=index.write_rows,
                              block_size=index.block_size, kv_len=index.kv_len, bias=index.bias)
    x = torch.randn(2, 1, model.config.hidden_size)
    cos, sin = model.rotary(view.positions)
    return block, plan, [x, cos, sin, kv, index, weights, config], view


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "mixed"])
def test_quantized_block_on_every_isa_equals_the_python_block(ext, fmt):  # noqa: F811
    """block_decode of each instruction set's build (the portable one included) against Block.forward."""
    torch.manual_seed(0)
    model = quantized(fmt)
    for layer in (1, 2):
        block, _, args, view = block_inputs(model, layer, ext)
        with torch.inference_mode():
            got = ext.block_decode(*args)
            ref, _ = Block.forward(block, args[0], args[1], args[2], view, layer)  # module by module
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_malformed_quantized_block_weights_give_one_line_errors(built):  # noqa: F811
    ext = kernels.load()
    model = quantized("int8")
    _, plan, args, _ = block_inputs(model, 1)
    tensors = dict(zip(plan.names, plan.tensors()))
    q4, s4 = quant.quantize(torch.randn(model.config.hidden_size, 64), "int4", 32)

    def call(**change):
        w = kernels.block_weights(**{**tensors, **change})
        with torch.inference_mode():
            return ext.block_decode(*args[:5], w, args[6])

    o, o_s = tensors["o_proj"], tensors["o_proj_scale"]
    ex_s = tensors["experts_gate_up_proj_scale"]
    cases = [
        (dict(o_proj_scale=o_s[:-1].contiguous()),
         r"BlockWeights.o_proj's scale must have shape \[128, 2\], got \[127, 2\]"),
        (dict(o_proj_scale=o_s.t()), "BlockWeights.o_proj's scale must be contiguous"),
        (dict(o_proj_scale=torch.ones(o.shape[0], 3)), "o_proj: 3 scale groups do not divide 64 inputs"),
        (dict(o_proj_scale=None), "BlockWeights.o_proj: int8 weights need their scales"),
        (dict(o_proj=o.float(), o_proj_scale=o_s), "BlockWeights.o_proj: only int8 and int4 weights take scales"),
        (dict(o_proj=o.half(), o_proj_scale=None), r"o_proj must be float32, bfloat16, int8 or uint8 \(packed int4\)"),
        (dict(o_proj=q4[:, :-1].contiguous(), o_proj_scale=s4), "o_proj rows hold 31 bytes"),
        (dict(o_proj=o[:-1].contiguous(), o_proj_scale=o_s[:-1].contiguous()),
         r"BlockWeights.o_proj must have shape \[128, 64\]"),
        (dict(experts_gate_up_proj_scale=ex_s[:-1].contiguous()), "experts_gate_up_proj's scale must have shape"),
        (dict(experts_down_proj_scale=None), "experts_down_proj: int8 weights need their scales"),
        (dict(kv_b_proj=quant.quantize(tensors["kv_b_proj"], "int8")[0]), "kv_b_proj must be an fp32 CPU tensor"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match) as e:
            call(**change)
        assert "\n" not in str(e.value).strip(), str(e.value)
    # the packed int4 weight of the right shape is taken (with its scale)
    dense = call(o_proj=quant.dequantize(q4, s4), o_proj_scale=None)
    torch.testing.assert_close(call(o_proj=q4, o_proj_scale=s4), dense, rtol=1e-4, atol=1e-5)
