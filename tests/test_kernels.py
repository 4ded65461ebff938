"""The C++ decode kernels (nanoseek.infer.fast) against the torch paths they replace, their argument checks,
and their build: the cache key and the failed-build record.

A machine without a working compiler fails these tests rather than skipping them, unless the kernels are
turned off on purpose (NANOSEEK_KERNELS=0); under NANOSEEK_STRICT=1 (CI) even that is a failure.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams, fast
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.fast import build, kernels, modules
from nanoseek.model import Transformer
from nanoseek.model.transformer import Block

STRICT = os.environ.get("NANOSEEK_STRICT") == "1"


@pytest.fixture(scope="module")
def built():
    if not build.enabled():
        msg = "the C++ decode kernels are turned off (NANOSEEK_KERNELS=0)"
        if STRICT:
            pytest.fail(msg + " under NANOSEEK_STRICT=1")
        pytest.skip(msg)
    if kernels.load() is None:
        pytest.fail(f"the C++ decode kernels did not build ({kernels.status()['reason']}); fix the toolchain "
                    "or set NANOSEEK_KERNELS=0 to run without them")


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", **{"initializer_range": 0.1, **kw})).eval()


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_matmul_equals_f_linear(built, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        # Odd sizes exercise the tails; fewer than four output rows, or a remainder after four equal parts,
        # the rows a few-row matmul reads outside its parallel streams.
        for n_out, n_in in [(384, 256), (1000, 203), (8, 5), (4096, 512), (1, 64), (3, 100), (7, 33), (6, 8)]:
            w = torch.randn(n_out, n_in)
            for rows in (1, 2, 3, 4, 5, 7, 8, 9, 16, 32):
                x = torch.randn(rows, n_in)
                torch.testing.assert_close(kernels.rows_matmul(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
        # FastLinear's few-row path goes through the kernel up to KERNEL_ROWS rows, whatever the input's shape.
        w = torch.randn(384, 256)
        with torch.no_grad():
            for rows in (1, 2, 5, 32, 33):
                x = torch.randn(rows, 256)
                for xin in (x, x[:, None, :], x.view(1, rows, 256)):
                    got = modules.few_rows_linear(xin, w)
                    assert got.shape == xin.shape[:-1] + (384,) and got.is_contiguous()
                    torch.testing.assert_close(got, torch.nn.functional.linear(xin, w), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_streams_sums_every_element(built, threads):
    """The benchmarks' memory-read probe reads every element once, whatever the split into streams."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 7, 8, 100, 4099, 1 << 16):
            x = torch.arange(n, dtype=torch.float32) % 97
            for streams in (1, 2, 4, 8):
                assert kernels.read_streams(x, streams) == pytest.approx(float(x.double().sum()), rel=1e-6)
        with pytest.raises(RuntimeError, match="streams must be 1, 2, 4 or 8"):
            kernels.read_streams(x, 3)
        with pytest.raises(RuntimeError, match="must have 1 dimensions"):
            kernels.read_streams(x.view(2, -1), 2)
    finally:
        torch.set_num_threads(old)


def test_bandwidth_reports_the_fastest_read_as_the_roofline(built):
    """benchmarks.common.bandwidth: every read pattern measured, the fastest of them the roofline."""
    from benchmarks.common import bandwidth, bandwidth_gbs

    bw = bandwidth()
    assert set(bw["read_by_pattern_gbs"]) == {"torch_sum", "streams_2", "streams_4", "streams_8"}
    assert bw["read_gbs"] == max(bw["read_by_pattern_gbs"].values()) > 0 and bw["copy_gbs"] > 0
    assert bandwidth_gbs() > 0


def test_experts_rows_and_rms_norm_equal_torch(built):
    torch.manual_seed(0)
    moe = tiny(initializer_range=0.2, n_routed_experts=8, num_experts_per_tok=3).layers[1].mlp
    with torch.no_grad():
        for n in (1, 2, 5, 40):  # 40 tokens x 3 puts more than 8 rows (one register block) on some experts
            x = torch.randn(n, moe.cfg.hidden_size)
            w, idx, _ = moe.gate(x)
            ref = moe.routed_experts(x, w, idx)  # the pure module: grouped_mm
            got = kernels.experts_rows(x, moe.experts.gate_up_proj, moe.experts.down_proj, idx, w)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        x, weight = torch.randn(3, 5, 200), torch.randn(200)
        ref = weight * torch.nn.functional.rms_norm(x, (200,), eps=1e-6)
        torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kernels.rms_norm(x.transpose(0, 1), weight, 1e-6), ref.transpose(0, 1),
                                   rtol=1e-5, atol=1e-6)  # a strided input


VARIANTS = [
    {},
    {"q_lora_rank": None, "rope_interleave": False},
    {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False, "n_group": 1, "topk_group": 1},
    {"topk_method": "group_limited_greedy", "scoring_func": "softmax", "n_shared_experts": 0},
    {"first_k_dense_replace": 2},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_decode_blocks_in_kernels_equal_the_pure_blocks(built, overrides, monkeypatch, paged_rows):
    """The accelerated model runs decode steps through kernels.block_decode (every block, every step);
    logits and the MTP head's must equal the pure model's for every routing / attention variant."""
    pure = tiny(hidden_size=256, moe_intermediate_size=256, **overrides)
    acc = fast.accelerate(copy.deepcopy(pure))
    calls = []
    monkeypatch.setattr(kernels, "block_decode", lambda *a, f=kernels.block_decode: calls.append(1) or f(*a))
    ids = torch.randint(0, pure.config.vocab_size, (3, 12))
    slots = torch.tensor([2, 0, 1])  # not a contiguous range: the cache rows are gathered
    outs = []
    for model in (acc, pure):
        _, view = paged_rows(model, 3, 16)
        with torch.inference_mode():
            _, h = model.forward_cached(ids[:, :10], view(slots, torch.zeros(3, dtype=torch.long), 10))
            assert not calls  # a prefill takes the naive attention in Python (and the pure model never C++)
            step, h1 = model.forward_cached(ids[:, 10:11], view(slots, torch.full((3,), 10), 1))
            verify, _ = model.forward_cached(ids[:, 10:12], view(slots, torch.tensor([10, 9, 10]), 2))
            mtp, _ = model.mtp_forward_cached(h1, ids[:, 11:12], view(slots, torch.full((3,), 10), 1))
            mixed, _ = model.forward_cached(ids[:, 11:12], view(slots, torch.tensor([11, 7, 11]), 1))
            ranged, _ = model.forward_cached(ids[:2, 11:12], view(torch.tensor([0, 1]), torch.full((2,), 11), 1))
        outs.append((step, verify, mtp, mixed, ranged))
        if model is acc:
            assert len(calls) == 4 * pure.config.num_hidden_layers + 1  # four steps and the MTP module, in C++
            calls.clear()
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS[:4] + [{"n_routed_experts": 128, "n_group": 8, "topk_group": 3,
                                                         "moe_intermediate_size": 16}])
def test_decode_block_routes_ties_as_torch_topk(built, overrides, paged_rows):
    """The C++ router (csrc/router.h) breaks ties between equal scores, and between equal groups, the way
    torch.topk does: with a zero router every expert scores the same, and the correction bias repeats a
    few values, so nearly every choice is a tie (128 experts: torch's partial-sort path, not nth_element)."""
    pure = tiny(**overrides)
    with torch.no_grad():
        for layer in pure.layers[pure.config.first_k_dense_replace:]:
            layer.mlp.gate.weight.zero_()
            E = layer.mlp.gate.e_score_correction_bias.numel()
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.25, 0.25, 0.5]).repeat(E // 4))
    acc = fast.accelerate(copy.deepcopy(pure))
    ids = torch.randint(0, pure.config.vocab_size, (3, 11))
    slots = torch.tensor([2, 0, 1])
    torch.testing.assert_close(prefill_then_step(acc, paged_rows, ids, slots),
                               prefill_then_step(pure, paged_rows, ids, slots), rtol=1e-4, atol=1e-5)


def test_decode_block_follows_reloaded_cast_and_replaced_weights(built, paged_rows):
    """The C++ block reads the block's current tensors: after load_state_dict, a round trip through bf16
    and a replaced Parameter, its steps still equal the pure model's with the same weights."""
    pure = tiny(hidden_size=128, moe_intermediate_size=128)
    acc = fast.accelerate(copy.deepcopy(pure))
    ids = torch.randint(0, pure.config.vocab_size, (2, 8))
    slots = torch.tensor([0, 1])

    def same():
        torch.testing.assert_close(prefill_then_step(acc, paged_rows, ids, slots),
                                   prefill_then_step(pure, paged_rows, ids, slots), rtol=1e-4, atol=1e-5)

    same()
    torch.manual_seed(1)
    new = {k: torch.randn_like(v) * 0.1 if v.is_floating_point() else v for k, v in pure.state_dict().items()}
    for model in (pure, acc):
        model.load_state_dict(new)
    same()
    acc.cast(torch.bfloat16).cast(torch.float32)
    pure.cast(torch.bfloat16).cast(torch.float32)
    same()
    w = torch.randn_like(pure.layers[1].self_attn.o_proj.weight)
    for model in (pure, acc):
        model.layers[1].self_attn.o_proj.weight = torch.nn.Parameter(w.clone())
        model.layers[1].mlp.experts.gate_up_proj = torch.nn.Parameter(model.layers[1].mlp.experts.gate_up_proj * 2)
    same()


def prefill_then_step(model, paged_rows, ids, slots, max_len=16):
    """The logits of one decode step on the last token of each row of ids [B, T], after a prefill of the
    others, on a fresh paged cache whose rows `slots` [B] the sequences take."""
    _, view = paged_rows(model, int(slots.max()) + 1, max_len)
    B, T = ids.shape
    with torch.inference_mode():
        model.forward_cached(ids[:, :-1], view(slots, torch.zeros(B, dtype=torch.long), T - 1))
        return model.forward_cached(ids[:, -1:], view(slots, torch.full((B,), T - 1), 1))[0]


def one_row_decode(model, paged_rows):
    """A function running a 7-token prefill and one decode step of one row (the same 8 random tokens each
    time, on a paged cache), returning the step's logits."""
    _, view = paged_rows(model, 1, 16)
    ids, slot = torch.randint(0, model.config.vocab_size, (1, 8)), torch.tensor([0])

    def decode():
        with torch.inference_mode():
            model.forward_cached(ids[:, :7], view(slot, torch.zeros(1, dtype=torch.long), 7))
            return model.forward_cached(ids[:, 7:], view(slot, torch.full((1,), 7), 1))[0]

    return decode


def test_decode_block_steps_aside_for_a_hook_added_after_its_first_step(built, paged_rows, monkeypatch):
    """A forward hook registered on a module inside a block once its plan exists sends the block back to
    the Python path (the hook sees every decode step); removing it brings the C++ block back."""
    model = fast.accelerate(tiny(hidden_size=128, moe_intermediate_size=128))
    calls = {"block": 0, "hook": 0}
    block_decode = kernels.block_decode

    def counted(*a):
        calls["block"] += 1
        return block_decode(*a)

    monkeypatch.setattr(kernels, "block_decode", counted)
    decode = one_row_decode(model, paged_rows)

    first = decode()
    n_layers = len(model.layers)
    assert calls["block"] == n_layers
    handle = model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__("hook", calls["hook"] + 1))
    torch.testing.assert_close(decode(), first)
    # the hook ran in the prefill and in the decode step, where its block took the Python path
    assert calls["hook"] == 2 and calls["block"] == 2 * n_layers - 1
    handle.remove()
    torch.testing.assert_close(decode(), first)
    assert calls["hook"] == 2 and calls["block"] == 3 * n_layers - 1


def test_a_decode_step_runs_the_blocks_back_to_back_without_their_module_calls(built, paged_rows, monkeypatch):
    """FastTransformer: with every block able to, a decode step calls kernels.block_decode once per block and
    no block's forward; a prefill goes through each block's forward."""
    from nanoseek.infer.fast.modules import FastBlock, FastTransformer

    model = fast.accelerate(tiny(hidden_size=128, moe_intermediate_size=128))
    assert type(model) is FastTransformer
    forwards = []
    block_forward = FastBlock.forward
    monkeypatch.setattr(FastBlock, "forward", lambda self, *a, **k: forwards.append(1) or block_forward(self, *a, **k))
    _, view = paged_rows(model, 1, 16)
    ids, slot = torch.randint(0, model.config.vocab_size, (1, 8)), torch.tensor([0])
    with torch.inference_mode():
        model.forward_cached(ids[:, :7], view(slot, torch.zeros(1, dtype=torch.long), 7))
        assert len(forwards) == len(model.layers)
        forwards.clear()
        model.forward_cached(ids[:, 7:], view(slot, torch.full((1,), 7), 1))
    assert not forwards


def test_a_switch_of_the_kernel_isa_gives_the_blocks_plans_of_the_new_build(built, paged_rows, monkeypatch):
    """A block's plan holds objects of the extension it was made with; after NANOSEEK_KERNEL_ISA names
    another build, the next decode step makes a plan of that build, with the same logits."""
    isas = [isa for isa in build.runnable_isas() if build.load(isa=isa) is not None]
    if len(isas) < 2:
        pytest.skip("one kernel build runs here")
    model = fast.accelerate(tiny(hidden_size=128, moe_intermediate_size=128))
    decode = one_row_decode(model, paged_rows)

    outs = []
    for isa in isas[:2]:
        monkeypatch.setenv(build.ISA_ENV, isa)
        outs.append(decode())
        assert all(b.__dict__["_kernel_plan"].extension is build.load(isa=isa) for b in model.layers)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)

def greedy_with_cache(model, prompt, n, dtype):
    """Greedy tokens of one prompt decoded by hand on a reference cache of `dtype`."""
    cache = model.new_cache(1, len(prompt) + n, dtype=dtype)
    zero = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits, _ = model.forward_cached(torch.tensor([prompt]), cache.view(zero, zero, len(prompt)))
        out = [int(logits[0, -1].argmax())]
        for pos in range(len(prompt), len(prompt) + n - 1):
            logits, _ = model.forward_cached(torch.tensor([[out[-1]]]), cache.view(zero, torch.tensor([pos]), 1))
            out.append(int(logits[0, 0].argmax()))
    return out


def test_a_bf16_cache_keeps_the_torch_blocks(built, monkeypatch):
    """The kernel block reads and writes an fp32 cache; an engine with a bf16 cache must decode through the
    Python blocks, and give the tokens of the pure model on a bf16 cache."""
    pure = tiny()
    model = copy.deepcopy(pure)
    monkeypatch.setattr(kernels, "block_decode", lambda *a: pytest.fail("the C++ block ran on a bf16 cache"))
    engine = Engine(model, max_batch_size=2, max_len=24, dtype=torch.bfloat16)
    assert engine.cache.dtype == torch.bfloat16 and type(model.layers[0]) is modules.FastBlock
    prompts = [[3, 4, 5], [6, 7]]
    out = engine.generate_batch(prompts, SamplingParams(max_tokens=8))
    assert [c.token_ids for c in out] == [greedy_with_cache(pure, p, 8, torch.bfloat16) for p in prompts]


def test_kernel_entry_points_check_their_arguments(built):
    """Every shape, size, dtype and layout the kernels rely on is checked before a pointer is touched."""
    ext = kernels.load()
    w = torch.randn(16, 8)
    for args, match in [((torch.zeros(0, 8), w), "empty batch"), ((torch.randn(2, 7), w), "has 7 columns"),
                        ((torch.randn(2, 8).double(), w), "fp32"), ((torch.randn(8, 2).t(), w), "contiguous"),
                        ((torch.randn(2, 8), torch.zeros(0, 8)), "empty weight")]:
        with pytest.raises(RuntimeError, match=match):
            ext.rows_matmul(*args)
    w1, w2 = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    x, gate = torch.randn(2, 8), torch.rand(2, 2)
    for args, match in [((x, w1, w2, torch.tensor([[0, 4], [1, 2]]), gate), "expert id out of range"),
                        ((x, w1, w2, torch.tensor([[0, -1], [1, 2]]), gate), "expert id out of range"),
                        ((x[:0], w1, w2, torch.zeros(0, 2, dtype=torch.long), gate[:0]), "no assignments"),
                        ((x, w1, torch.randn(4, 8, 4), torch.tensor([[0, 1], [1, 2]]), gate), "w2 must have shape"),
                        ((x, w1, w2, torch.tensor([[0, 1, 2], [1, 2, 3]]), gate), "gate must have shape"),
                        ((x, w1, w2, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), gate), "int64")]:
        with pytest.raises(RuntimeError, match=match):
            ext.experts_rows(*args)
    with pytest.raises(RuntimeError, match="has 8 features but the weight 7"):
        ext.rms_norm(x, torch.ones(7), 1e-6)

    # block_decode: a valid call, then one broken argument at a time.
    model = fast.accelerate(tiny())
    block = model.layers[1]
    plan = modules._KernelPlan(block)
    cache = PagedCache.for_model(model, 8, 4, torch.float32, "cpu")
    view = cache.view([[6, 2], [1, 7, 0]], torch.tensor([5, 3]), 1)  # the second row has a spare block
    kv, index = view.kernel_cache(1, block.self_attn.n_heads)
    x = torch.randn(2, 1, model.config.hidden_size)
    cos, sin = model.rotary(view.positions)

    def call(**change):
        a = {**dict(x=x, cos=cos, sin=sin, kv_layer=kv, index=index, weights=plan.weights(), config=plan.config),
             **change}
        with torch.inference_mode():
            return ext.block_decode(a["x"], a["cos"], a["sin"], a["kv_layer"], a["index"], a["weights"], a["config"])

    got = call()
    with torch.inference_mode():
        ref, _ = Block.forward(block, x, cos, sin, view, 1)  # the pure block's forward
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    def index_with(**f):
        base = dict(block_table=index.block_table, write_rows=index.write_rows, block_size=index.block_size,
                    kv_len=index.kv_len, bias=index.bias)
        return ext.CacheIndex(**{**base, **f})

    def weights_with(**f):
        return kernels.block_weights(**{**dict(zip(plan.names, plan.tensors())), **f})

    def config_with(**f):
        cfg = ext.BlockConfig()
        for name in dir(plan.config):
            if not name.startswith("_") and name != "check":
                setattr(cfg, name, getattr(plan.config, name))
        for name, value in f.items():
            setattr(cfg, name, value)
        return cfg

    C, D = model.config.kv_lora_rank, model.config.hidden_size
    cases = [
        (dict(x=x[:0]), "empty batch"),
        (dict(x=torch.randn(2, 1, D + 1)), "features, the config hidden_size"),
        (dict(x=x.double()), "fp32"),
        (dict(cos=cos[:, :, :-1].contiguous()), "cos must have shape"),
        (dict(kv_layer=kv[..., :-1].contiguous()), "cache rows hold"),
        (dict(index=index_with(block_table=torch.tensor([[6, 9], [1, 7]]))), "block 9 out of range"),
        (dict(index=index_with(block_table=torch.tensor([[6, 2]]))), "block_table must have 2 rows"),
        (dict(index=index_with(block_table=torch.tensor([[6, 2], [1, 7]], dtype=torch.int32))), "int64"),
        (dict(index=index_with(write_rows=torch.tensor([[5], [36]]))), "row 36 outside"),
        (dict(index=index_with(write_rows=torch.tensor([[5, 6], [3, 4]]))), "write_rows must have shape"),
        (dict(index=index_with(kv_len=9)), "kv_len 9 outside"),
        (dict(index=index_with(block_size=8)), "block_size 8"),
        (dict(index=index_with(bias=torch.zeros(2, 4, 3))), "bias must be"),
        (dict(weights=weights_with(kv_b_proj=plan.tensors()[plan.names.index("kv_b_proj")][:-1])), "kv_b_proj must have shape"),
        (dict(weights=weights_with(o_proj=plan.tensors()[plan.names.index("o_proj")].t())), "o_proj must be contiguous"),
        (dict(weights=kernels.block_weights()), "is not set"),
        (dict(config=config_with(topk_method="top2")), "unknown topk_method"),
        (dict(config=config_with(qk_rope_head_dim=7)), "must be even"),
        (dict(config=config_with(n_group=3, topk_group=1)), "do not split into 3 groups"),
        (dict(config=config_with(kv_lora_rank=C + 1)), "cache rows hold"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(**change)


# ----------------------------------------------------------------------------- the build
def test_build_key_separates_what_a_build_depends_on(tmp_path, monkeypatch):
    key = build.build_key()
    copy_ = tmp_path / "elsewhere"
    copy_.mkdir()
    for name in build.SOURCES + build.HEADERS:
        (copy_ / name).write_bytes((build.CSRC / name).read_bytes())
    assert build.build_key(csrc=copy_) == key  # another checkout of the same sources shares the build
    (copy_ / "gemv.h").write_text((build.CSRC / "gemv.h").read_text() + "\n// changed\n")
    assert build.build_key(csrc=copy_)["name"] != key["name"]  # the header counts too
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert build.build_key()["name"] != key["name"]
    monkeypatch.undo()
    other = "portable" if key["isa"] != "portable" else "avx2"
    assert build.build_key(other)["name"] != key["name"] and build.build_key(other)["isa"] == other
    monkeypatch.setenv("CXX", "clang++")
    assert build.build_key()["name"] != key["name"]
    monkeypatch.delenv("CXX")
    assert build.build_key() == key
    assert key["name"].startswith(f"nanoseek_decode_{key['isa']}_") and len(key["source_sha256"]) == 64


def _fake_compiler(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "compiler_calls.log"
    cxx = tmp_path / "broken-c++"
    cxx.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'broken-c++: error: this compiler is broken' >&2\nexit 1\n")
    cxx.chmod(0o755)
    return cxx, calls


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_build_is_recorded_shown_once_and_retried_on_request(tmp_path):
    cxx, calls = _fake_compiler(tmp_path)
    env = {**os.environ, "CXX": str(cxx), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "OMP_NUM_THREADS": "1"}
    env.pop("NANOSEEK_KERNELS", None)
    code = ("from nanoseek.infer.fast import kernels; import torch\n"
            "print(kernels.load() is None, kernels.usable(torch.ones(1)), kernels.status()['state'])")
    first = _python(code, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["True", "False", "failed"]
    assert "building the C++ decode kernels once" in first.stderr  # said before the compiler ran
    assert "has no OpenMP: the decode kernels run single-threaded" in first.stderr  # the probe failed too
    assert "this compiler is broken" in first.stderr and "nanoseek build-kernels" in first.stderr
    markers = list((tmp_path / "ext" / "nanoseek").glob("*.failed.json"))
    assert len(markers) == 1 and "this compiler is broken" in markers[0].read_text()
    n_calls = len(calls.read_text().splitlines())
    assert n_calls >= 1

    second = _python(code, env)  # another process: no new attempt, one line saying why and how to retry
    assert second.stdout.split() == ["True", "False", "failed"]
    assert len(calls.read_text().splitlines()) == n_calls
    assert "building" not in second.stderr and second.stderr.count("failed to build earlier") == 1
    assert "this compiler is broken" in second.stderr and "nanoseek build-kernels" in second.stderr

    retry = subprocess.run([sys.executable, "-m", "nanoseek.cli", "build-kernels"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert retry.returncode == 1 and "this compiler is broken" in retry.stderr
    assert len(calls.read_text().splitlines()) > n_calls


def test_build_kernels_command_reports_the_build(built):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "build-kernels", "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    key = build.build_key()
    assert info["ok"] and info["name"] == key["name"] and Path(info["library"]).is_file()
    assert info["openmp"] in ("-fopenmp", "none") or info["openmp"].startswith("libomp")
    assert "building" not in r.stderr  # this test session built it already: nothing to do


def test_nanoseek_kernels_0_disables_them(tmp_path):
    env = {**os.environ, "NANOSEEK_KERNELS": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    r = _python("from nanoseek.infer.fast import kernels; import torch\n"
                "print(kernels.load() is None, kernels.usable(torch.ones(1)), kernels.status()['state'])", env)
    assert r.stdout.split() == ["True", "False", "disabled"] and "building" not in r.stderr
    assert not (tmp_path / "ext").exists()


def test_build_lock_removes_the_baton_a_killed_build_left(tmp_path):
    """torch's build lock is a plain file: one left by a killed build would make every later build wait
    forever. Under nanoseek's flock a baton can only be stale, so it goes."""
    from nanoseek.infer.fast import build

    (tmp_path / "lock").touch()
    with build._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    with build._build_lock(tmp_path):  # released: a second build takes it again
        pass


def test_prefetch_distance_changes_speed_not_values(built):
    """Every prefetch distance the one- and two-row matmuls offer gives bitwise the same result (a hint
    changes when bytes arrive, never the sums); other distances are refused with a one-line error."""
    from nanoseek.infer import quant
    from nanoseek.infer.fast import prefetch

    ext = kernels.load()
    before = ext.narrow_prefetch()
    torch.manual_seed(0)
    w = torch.randn(300, 1024)
    weights = [(w.bfloat16(), None), quant.quantize_int8(w, 128), (w, None)]
    try:
        for rows in (1, 2, 3):
            x = torch.randn(rows, 1024)
            outs = {}
            for d in prefetch.DISTANCES:
                ext.set_narrow_prefetch(d)
                assert ext.narrow_prefetch() == d
                outs[d] = [ext.rows_matmul(x, q, s) for q, s in weights]
            for d in prefetch.DISTANCES[1:]:
                for a, b in zip(outs[0], outs[d]):
                    assert torch.equal(a, b)
        with pytest.raises(RuntimeError, match="0, 512, 1024 or 2048"):
            ext.set_narrow_prefetch(100)
    finally:
        ext.set_narrow_prefetch(before)


def test_prefetch_distance_is_measured_once_recorded_and_forced_by_env(built, tmp_path, monkeypatch, capsys):
    from nanoseek.infer.fast import prefetch

    ext = kernels.load()
    before = ext.narrow_prefetch()
    monkeypatch.setattr(prefetch, "PROBE_BYTES", 16 << 20)  # the mechanism, not a good measurement
    monkeypatch.delenv(prefetch.ENV, raising=False)
    try:
        first = prefetch.configure(ext, tmp_path, "build_x")
        assert first["source"] == "measured" and first["bytes"] in prefetch.DISTANCES
        assert set(first["read_gbs"]) == {str(d) for d in prefetch.DISTANCES}
        assert all(v > 0 for v in first["read_gbs"].values()) and ext.narrow_prefetch() == first["bytes"]
        record = prefetch.record_path(tmp_path, "build_x")
        assert record.is_file()
        again = prefetch.configure(ext, tmp_path, "build_x")  # read back, not measured again
        assert again["source"] == str(record) and again["bytes"] == first["bytes"]

        record.write_text("{not json")  # a corrupt record is measured again and rewritten
        assert prefetch.configure(ext, tmp_path, "build_x")["source"] == "measured"

        other = next(d for d in prefetch.DISTANCES if d != first["bytes"])
        monkeypatch.setenv(prefetch.ENV, str(other))
        assert prefetch.configure(ext, tmp_path, "build_x") == {"bytes": other, "source": prefetch.ENV}
        assert ext.narrow_prefetch() == other

        monkeypatch.setenv(prefetch.ENV, "300")  # refused in one line; the record is used instead
        assert prefetch.configure(ext, tmp_path, "build_x")["source"] == str(record)
        assert "NANOSEEK_PREFETCH='300' ignored" in capsys.readouterr().err
    finally:
        ext.set_narrow_prefetch(before)


# ----------------------------------------------------------------------------- the measured choice of build
def _vector_builds() -> dict:
    mods = {isa: build.load(isa=isa) for isa in build.KERNELS.candidates()}
    return {isa: m for isa, m in mods.items() if m is not None}


def test_build_choice_is_measured_recorded_and_read_back(tmp_path):
    """choice.choose times each build on the format's probe weights, records the winner under the CPU's
    identity, and a second call reads the record instead of measuring."""
    from nanoseek.infer.fast import choice

    mods = _vector_builds()
    if len(mods) < 2:
        pytest.skip("this CPU runs one vector build: nothing to choose")
    first = choice.choose("bf16", mods, tmp_path, build.cpu_identity(), torch.get_num_threads())
    assert first["source"] == "measured" and first["isa"] in mods
    score = first["score"]
    assert set(score) == set(mods)
    lowest = min(score, key=score.get)  # the winner, or the flags' first build where the others win by less than TIE
    assert first["isa"] == lowest or (first["isa"] == next(iter(mods))
                                      and score[lowest] > score[first["isa"]] * (1 - choice.TIE) - 1e-3)
    assert len(first["us"]) == 2 * len(choice.ROWS)
    again = choice.choose("bf16", mods, tmp_path, build.cpu_identity(), torch.get_num_threads())
    assert again["source"].endswith(".json") and again["isa"] == first["isa"]
    # another CPU identity has no record yet
    other = choice.record_path(tmp_path, "another cpu", {i: m.__name__ for i, m in mods.items()})
    assert not other.exists()


def test_prefer_format_selects_the_measured_build_and_env_overrides(monkeypatch):
    mods = _vector_builds()
    if len(mods) < 2:
        pytest.skip("this CPU runs one vector build: nothing to choose")
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    try:
        kernels.prefer_format("fp32")
        chosen = build.chosen_by()
        isa = kernels.isa()
        assert build.chosen_by()["by"] == "measured" and chosen.get("isa", isa) == isa
        monkeypatch.setenv(build.ISA_ENV, "portable")
        assert kernels.isa() == "portable" and build.chosen_by() == {"by": build.ISA_ENV}
        monkeypatch.delenv(build.ISA_ENV)
        kernels.prefer_format(None)
        assert kernels.isa() == build.runnable_isas()[0] and build.chosen_by()["by"] == "cpu flags"
        with pytest.raises(ValueError, match="unknown weight format"):
            kernels.prefer_format("fp8")
    finally:
        kernels.prefer_format(None)


def test_int8_activations_switch_reaches_every_loaded_build():
    mods = _vector_builds()
    try:
        kernels.set_int8_activations(True)
        assert all(m.int8_activations() for m in mods.values())
        kernels.set_int8_activations(False)
        assert not any(m.int8_activations() for m in mods.values())
    finally:
        kernels.set_int8_activations(False)


def test_accelerate_names_the_model_weight_format():
    from nanoseek.infer.quant import quantize_model

    model = Transformer(preset("tiny")).eval()
    assert fast.weight_format(model) == "fp32"
    assert fast.weight_format(quantize_model(copy.deepcopy(model), "int8")) == "int8"
    assert fast.weight_format(quantize_model(copy.deepcopy(model), "bf16")) == "bf16"
    assert fast.weight_format(model.to(torch.bfloat16)) is None


def test_build_choice_probes_the_groups_quantize_writes():
    from nanoseek.infer.fast import choice
    from nanoseek.infer.quant import DEFAULT_GROUPS

    assert choice.GROUPS == DEFAULT_GROUPS
