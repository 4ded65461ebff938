"""Instruction-set dispatch of the C++ kernels, bf16 / int8 / int4 weight-only decoding, and `nanoseek quantize`.

The kernels are checked against torch for every instruction set this CPU runs plus the forced portable
build (the one ARM machines get); the quantized model against the fp32 one (logits, greedy tokens); the
quantized checkpoint through the real command line, and broken ones for a one-line CheckpointError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import preset
from nanoseek.hf import CheckpointError
from nanoseek.infer import fast, quant
from nanoseek.infer.fast import build, build_cli, kernels
from nanoseek.model import Transformer

RUNNABLE = build.runnable_isas()


@pytest.fixture(scope="module", params=sorted(set(RUNNABLE)))
def ext(request):
    """The extension of each instruction set this CPU runs (portable included)."""
    if not build.enabled():
        pytest.skip("the C++ kernels are turned off (NANOSEEK_KERNELS=0)")
    module = build.load(isa=request.param)
    assert module is not None, build.status(request.param)["reason"]
    assert module.kernel_isa() == request.param
    return module


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return (x.double() @ quant.dequantize(w, scale, torch.float64).t()).float()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8-row", "int8-g32", "int8-g128", "int4-row", "int4-g32",
                                 "int4-g128", "int4-g10"])
def test_rows_matmul_every_isa_and_format_equals_torch(ext, fmt):
    torch.manual_seed(0)
    # Odd sizes exercise the tails, and 1, 3 and 7 output rows the rows read outside the parallel streams.
    shapes = [(384, 256), (100, 203), (8, 5), (1024, 512), (1, 64), (3, 96), (7, 203)]
    if fmt.startswith("int4"):  # two inputs a byte: even rows; groups of 10 leave a tail in every group
        shapes = [(384, 256), (100, 202), (8, 6), (1024, 512), (64, 250), (1, 64), (3, 96), (7, 202)]
    for n_out, n_in in shapes:
        w32 = torch.randn(n_out, n_in)
        if fmt == "fp32":
            w, s = w32, None
        elif fmt == "bf16":
            w, s = w32.bfloat16(), None
        else:
            kind, group = fmt.split("-")
            group = 0 if group == "row" else int(group[1:])
            w, s = quant.quantize(w32, kind, group)
            if group and n_in % group == 0:
                assert s.shape == (n_out, n_in // group)
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 17, 32):
            x = torch.randn(rows, n_in)
            got = ext.rows_matmul(x, w, s)
            torch.testing.assert_close(got, reference(x, w, s), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_experts_rows_every_isa_and_format_equals_torch(ext, fmt):
    torch.manual_seed(0)
    E, D, Fh, K = 6, 64, 96, 2
    w1, w2 = torch.randn(E, 2 * Fh, D) * 0.1, torch.randn(E, D, Fh) * 0.1
    s1 = s2 = None
    if fmt == "bf16":
        w1, w2 = w1.bfloat16(), w2.bfloat16()
    elif fmt in ("int8", "int4"):
        (w1, s1), (w2, s2) = quant.quantize(w1, fmt, 32), quant.quantize(w2, fmt, 32)
    d1, d2 = quant.dequantize(w1, s1), quant.dequantize(w2, s2)
    for n in (1, 3, 20):  # 20 tokens x 2 put more than 8 rows (one register block) on some experts
        x = torch.randn(n, D)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
        gate = torch.rand(n, K)
        g, u = torch.einsum("nd,nkfd->nkf", x, d1[idx]).chunk(2, dim=-1)
        ref = torch.einsum("nk,nkd->nd", gate, torch.einsum("nkf,nkdf->nkd", F.silu(g) * u, d2[idx]))
        torch.testing.assert_close(ext.experts_rows(x, w1, w2, idx, gate, s1, s2), ref, rtol=1e-4, atol=1e-5)


def int8_activation_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """csrc/gemv_int8act.h's definition in torch: x quantized per block of 128, 64 or 32 inputs (the largest
    dividing the weight's group), q = round(x * 127 / max|x|), each block's integer dot product with the int8
    or int4 weights exact in float64, scaled by both scales. None where no block fits the group (the
    weight-only path runs)."""
    M, K = x.shape
    if w.dtype == torch.uint8:  # packed int4: its integers, unscaled
        w = quant.dequantize(w, torch.ones_like(scale), torch.float64)
    G = K // scale.shape[1]
    B = next((b for b in (128, 64, 32) if G % b == 0), None)
    if B is None:
        return None
    xb = x.view(M, K // B, B)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / max|x| rounded once in fp32, as the kernel (torch's `127.0 / t` is t.reciprocal() * 127: twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127).double()
    dots = torch.einsum("mbk,nbk->mnb", q, w.double().view(-1, K // B, B))
    s_w = scale.double().repeat_interleave(G // B, dim=1)  # each block's weight scale
    return (dots * (amax.squeeze(-1).double() / 127.0)[:, None, :] * s_w[None]).sum(-1).float()


@pytest.fixture
def int8_activations_on(ext):
    ext.set_int8_activations(True)
    try:
        yield ext
    finally:
        ext.set_int8_activations(False)


def test_int8_activations_every_isa_equal_the_integer_reference(int8_activations_on):
    ext = int8_activations_on
    torch.manual_seed(0)
    # groups of 128, 64, 32 and whole rows (1536: blocks of 128); 203 inputs fit no block (weight-only path)
    cases = [("int8", 384, 256, 128), ("int8", 257, 1024, 64), ("int8", 100, 96, 32), ("int8", 300, 1536, 0),
             ("int8", 7, 203, 0),
             # int4: groups of 32 / 64 / 128 / whole rows in chunks of 128 or 64 inputs; rows of 192 fit only
             # the 64-input chunk, 202 none (and no block: the weight-only path runs)
             ("int4", 384, 256, 32), ("int4", 130, 512, 64), ("int4", 64, 1024, 128), ("int4", 33, 1536, 0),
             ("int4", 40, 192, 32), ("int4", 9, 202, 0)]
    for fmt, n_out, n_in, group in cases:
        w, s = quant.quantize(torch.randn(n_out, n_in) * 0.05, fmt, group)
        for rows in (1, 2, 3, 4, 5, 8, 9, 17, 32):
            x = torch.randn(rows, n_in)
            x[0, :32] = 0  # an all-zero block has scale 0
            want = int8_activation_reference(x, w, s)
            got = ext.rows_matmul(x, w, s)
            if want is None:
                ext.set_int8_activations(False)
                torch.testing.assert_close(got, ext.rows_matmul(x, w, s), rtol=0, atol=0)
                ext.set_int8_activations(True)
                continue
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # and it is the weights' matmul to within the activations' rounding
            exact = reference(x, w, s)
            assert ((got - exact).norm() / exact.norm()) < 0.02, (fmt, n_out, n_in, group, rows)
    # the routed experts take them too: per expert, x into w1 and the SwiGLU activation into w2
    E, D, Fh, K = 6, 128, 64, 2
    for fmt, n in [("int8", 1), ("int8", 3), ("int8", 20), ("int4", 1), ("int4", 20)]:
        (w1, s1), (w2, s2) = quant.quantize(torch.randn(E, 2 * Fh, D) * 0.1, fmt, 32), \
            quant.quantize(torch.randn(E, D, Fh) * 0.1, fmt, 32)
        x = torch.randn(n, D)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
        gate = torch.rand(n, K)
        want = torch.zeros(n, D)
        for t in range(n):
            for k in range(K):
                e = int(idx[t, k])
                g, u = int8_activation_reference(x[t:t + 1], w1[e], s1[e]).chunk(2, dim=-1)
                want[t] += gate[t, k] * int8_activation_reference(F.silu(g) * u, w2[e], s2[e])[0]
        torch.testing.assert_close(ext.experts_rows(x, w1, w2, idx, gate, s1, s2), want, rtol=1e-4, atol=1e-5)
    assert ext.int8_activations()
    assert ext.int8_activation_kernel() in {"avx512": ("avx512-vnni", "avx2"), "avx2": ("avx2",),
                                            "portable": ("portable",)}[ext.kernel_isa()]


def test_int8_activations_are_off_by_default_and_leave_float_weights_alone(ext):
    assert not ext.int8_activations()
    torch.manual_seed(1)
    x = torch.randn(2, 256)
    w32 = torch.randn(64, 256)
    outs = {}
    for on in (False, True):
        ext.set_int8_activations(on)
        try:
            outs[on] = [ext.rows_matmul(x, w32), ext.rows_matmul(x, w32.bfloat16())]
        finally:
            ext.set_int8_activations(False)
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)


def test_kernel_argument_checks(ext):
    x = torch.randn(2, 64)
    q, s = quant.quantize_int8(torch.randn(16, 64), 32)
    with pytest.raises(RuntimeError, match="int8 weights need their scales"):
        ext.rows_matmul(x, q)
    with pytest.raises(RuntimeError, match="only int8 and int4 weights take scales"):
        ext.rows_matmul(x, torch.randn(16, 64), s)
    with pytest.raises(RuntimeError, match="do not divide"):
        ext.rows_matmul(x, q, torch.ones(16, 3))
    with pytest.raises(RuntimeError, match=r"must be float32, bfloat16, int8 or uint8 \(packed int4\)"):
        ext.rows_matmul(x, torch.randn(16, 64).half())
    p4, s4 = quant.quantize_int4(torch.randn(16, 64), 32)
    with pytest.raises(RuntimeError, match="int4 weights need their scales"):
        ext.rows_matmul(x, p4)
    with pytest.raises(RuntimeError, match="63 inputs is odd"):
        ext.rows_matmul(torch.randn(2, 63), p4, s4)
    with pytest.raises(RuntimeError, match="rows hold 32 bytes"):  # an unpacked row count for packed weights
        ext.rows_matmul(torch.randn(2, 32), p4, s4)
    with pytest.raises(RuntimeError, match="even number of inputs, got 1"):  # a group would start mid-byte
        ext.rows_matmul(x, p4, torch.ones(16, 64))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=900)


def test_the_isa_is_chosen_at_start_and_can_be_forced():
    code = "from nanoseek.infer.fast import kernels; print(kernels.isa())"
    best = _python(code)
    assert best.returncode == 0, best.stderr
    assert best.stdout.split()[-1] == RUNNABLE[0]
    forced = _python(code, NANOSEEK_KERNEL_ISA="portable")
    assert forced.stdout.split()[-1] == "portable", forced.stderr
    bogus = _python(code, NANOSEEK_KERNEL_ISA="sse9")
    assert bogus.stdout.split()[-1] == "None" and "choose one of avx512, avx2, portable" in bogus.stderr
    if "avx512" not in RUNNABLE:  # refused rather than crashing on the first AVX-512 instruction
        refused = _python(code, NANOSEEK_KERNEL_ISA="avx512")
        assert refused.stdout.split()[-1] == "None"
        assert "this CPU cannot run it" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_int8_activations_from_the_environment():
    code = "from nanoseek.infer.fast import kernels, build; print(kernels.int8_activations(), build.status()['int8_activations'])"
    on = _python(code, NANOSEEK_INT8_ACTIVATIONS="1")
    assert on.stdout.startswith("True {'on': True, 'kernel': "), on.stderr
    off = _python(code)
    assert off.stdout.startswith("False {'on': False"), off.stderr
    bogus = _python(code, NANOSEEK_INT8_ACTIVATIONS="yes")
    assert bogus.stdout.startswith("False") and "NANOSEEK_INT8_ACTIVATIONS='yes' ignored (1 = on, 0 = off)" in bogus.stderr


@pytest.mark.slow  # a whole extra build (~1.5 min on 2 cores); `make test-slow`
@pytest.mark.skipif("avx512" in RUNNABLE or not build_cli.compiler_takes("avx512"),
                    reason="the CPU runs AVX-512 (the ISA tests above cover it) or the compiler lacks it")
def test_the_avx512_build_compiles_on_a_cpu_that_cannot_run_it(tmp_path):
    objects = build_cli.compile_only("avx512", tmp_path)
    assert all(o.is_file() and o.stat().st_size > 0 for o in objects)


def test_few_row_paths_are_measured_against_torch(monkeypatch):
    if kernels.load() is None:
        pytest.skip("no kernels")
    kernels.PATHS.clear()
    lin = quant.QuantLinear.from_linear(torch.nn.Linear(256, 384, bias=False), "int8", 64)
    with torch.no_grad():
        x = torch.randn(3, 256)
        ref = x @ lin.dense_weight().t()
        for _ in range(2):
            torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)
    (entry,) = kernels.PATHS.table()
    threads = torch.get_num_threads()
    assert entry["key"] == ["int8", "384", "256", "4", "4", str(threads)] and entry["path"] in ("kernel", "torch")
    assert entry["kernel_s"] > 0 and entry["torch_s"] > 0
    torch.set_num_threads(threads + 1)  # another thread count is measured anew
    try:
        with torch.no_grad():
            torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert [e["key"][-1] for e in kernels.PATHS.table()] == sorted([str(threads), str(threads + 1)])
    kernels.PATHS.clear()
    monkeypatch.setenv(kernels.PATHS_ENV, "torch")
    with torch.no_grad():
        lin(x)
    assert kernels.PATHS.table()[0]["path"] == "torch" and kernels.PATHS.table()[0]["kernel_s"] is None
    kernels.PATHS.clear()


def test_prefill_rows_of_int8_and_int4_weights_are_measured_per_mode_and_bf16_stays_torch(monkeypatch):
    """Up to PREFILL_KERNEL_ROWS rows of int8 / int4 weights are measured too, per int8-activation mode
    (the kernel forced here, so both modes run it); bf16 weights past KERNEL_ROWS keep torch's path."""
    if kernels.load() is None:
        pytest.skip("no kernels")
    kernels.PATHS.clear()
    monkeypatch.setenv(kernels.PATHS_ENV, "kernel")
    torch.manual_seed(0)
    x = torch.randn(100, 256)
    try:
        for fmt, group in (("int8", 128), ("int4", 32)):
            lin = quant.QuantLinear.from_linear(torch.nn.Linear(256, 384, bias=False), fmt, group)
            with torch.no_grad():
                ref = x @ lin.dense_weight().t()
                torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)  # 100 rows: the kernel, exactly
                kernels.set_int8_activations(True)
                try:
                    got = lin(x)
                finally:
                    kernels.set_int8_activations(False)
            assert ((got - ref).norm() / ref.norm()) < 0.02  # within the activations' rounding
        keys = {tuple(e["key"][:-1]) for e in kernels.PATHS.table()}
        assert keys == {("int4", "384", "256", "8", "128"), ("int4", "384", "256", "8", "128", "a8"),
                        ("int8", "384", "256", "2", "128"), ("int8", "384", "256", "2", "128", "a8")}
        kernels.PATHS.clear()
        lin = quant.QuantLinear.from_linear(torch.nn.Linear(256, 384, bias=False), "bf16")
        with torch.no_grad():
            lin(x)
        assert kernels.PATHS.table() == []  # bf16 at 100 rows: torch's path, unmeasured
        x_big = torch.randn(quant.PREFILL_KERNEL_ROWS + 1, 256)
        with torch.no_grad():
            quant.QuantLinear.from_linear(torch.nn.Linear(256, 384, bias=False), "int8")(x_big)
        assert kernels.PATHS.table() == []  # past PREFILL_KERNEL_ROWS: torch's GEMM
    finally:
        kernels.PATHS.clear()


# ----------------------------------------------------------------------------- quantized models
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    # a larger init than training's: peaked logits (greedy tokens not decided by near-ties), yet no routing chaos
    return Transformer(preset("tiny", initializer_range=0.1, n_routed_experts=8, num_experts_per_tok=2)).eval()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "model"
    nanoseek.save(tiny_model(), path)
    return path


def quantize_cli(src: Path, out: Path, fmt: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", "quantize", "--model", str(src), "--to", fmt,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("fmt,group,tol", [("int8", 32, 0.03), ("int8", 0, 0.05), ("bf16", 0, 0.01)])
def test_quantized_model_matches_fp32(fmt, group, tol):
    dense = tiny_model()
    q = quant.quantize_model(tiny_model(), fmt, group)
    assert quant.is_quantized(q) and type(q.layers[0].self_attn.kv_b_proj) is torch.nn.Linear
    assert type(q.layers[1].mlp.experts) is quant.QuantExperts
    fast.accelerate(dense), fast.accelerate(q)
    ids = torch.randint(0, dense.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref, got = dense(ids), q(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tol
    prompts = [ids[0].tolist(), ids[1, :5].tolist()]
    a = nanoseek.generate(dense, prompts, max_new_tokens=16)
    b = nanoseek.generate(q, prompts, max_new_tokens=16)
    agree = sum(x == y for p, r in zip(a, b) for x, y in zip(p, r)) / sum(map(len, a))
    assert agree >= 0.9, (a, b)


def test_int8_activations_decode_close_to_int8_weights():
    dense = tiny_model()
    q = fast.accelerate(quant.quantize_model(tiny_model(), "int8", 32))
    fast.accelerate(dense)
    ids = torch.randint(0, dense.config.vocab_size, (2, 12))
    prompts = [ids[0].tolist(), ids[1, :5].tolist()]
    with torch.no_grad():
        ref, w8 = dense(ids), q(ids)
    kernels.set_int8_activations(True)
    try:
        assert kernels.int8_activations()
        with torch.no_grad():
            a8 = q(ids)
        tokens = nanoseek.generate(q, prompts, max_new_tokens=16)
    finally:
        kernels.set_int8_activations(False)
    assert not torch.equal(a8, w8)  # the activations were quantized: the kernels took them
    # per position (a routing decision flipped by either rounding moves one position a lot): the median
    error = {name: ((y - ref).norm(dim=-1) / ref.norm(dim=-1)).median().item() for name, y in (("w8", w8), ("a8", a8))}
    assert error["a8"] < 2 * error["w8"] + 0.005, error  # the activations' rounding adds about as much again
    want = nanoseek.generate(dense, prompts, max_new_tokens=16)
    agree = sum(x == y for p, r in zip(want, tokens) for x, y in zip(p, r)) / sum(map(len, want))
    assert agree >= 0.9, (want, tokens)


def test_quantize_cli_round_trip(dense_dir, tmp_path):
    out = tmp_path / "int8"
    r = quantize_cli(dense_dir, out, "int8", "--group-size", "32", "--max-shard-gb", "0.0005")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "nanoseek"
    assert cfg["quantization_config"]["weight_format"] == "int8" and cfg["quantization_config"]["group_size"] == 32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = load_file(str(out / index["weight_map"][key]))
    assert shard[key].dtype == torch.int8 and (key + "_scale") in index["weight_map"]

    loaded = nanoseek.load(out)
    assert loaded.weight_format == {"format": "int8", "group_size": 32}
    assert loaded.layers[1].mlp.experts.gate_up_proj.dtype == torch.int8
    default = tmp_path / "int8-default-group"
    assert quantize_cli(dense_dir, default, "int8").returncode == 0
    at_load = nanoseek.load(dense_dir, weights="int8").state_dict()  # converted while loading: the same tensors
    for name, t in nanoseek.load(default).state_dict().items():
        assert torch.equal(t, at_load[name]), name
    dense = nanoseek.load(dense_dir)
    expanded = nanoseek.load(out, weights="dense")
    ids = torch.randint(0, dense.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = dense(ids)
        for m in (loaded, expanded):
            assert ((m(ids) - ref).abs().max() / ref.abs().max()).item() < 0.02
    with pytest.raises(CheckpointError, match="nanoseek quantize"):
        nanoseek.save(loaded, tmp_path / "again")

    bf = tmp_path / "bf16"
    assert quantize_cli(dense_dir, bf, "bf16").returncode == 0
    m = nanoseek.load(bf)
    assert m.lm_head.weight.dtype == torch.bfloat16 and m.norm.weight.dtype == torch.float32
    again = quantize_cli(out, tmp_path / "twice", "int8")
    assert again.returncode == 1 and "already a nanoseek int8 checkpoint" in again.stderr


def test_generate_cli_uses_a_quantized_checkpoint_and_dtype_at_load(chat_model_dir, tmp_path):
    out = tmp_path / "int8"
    assert quantize_cli(chat_model_dir, out, "int8").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, args in {"dense": ["--model", str(chat_model_dir)], "int8": ["--model", str(out)],
                       "at-load": ["--model", str(chat_model_dir), "--dtype", "int8"],
                       "bf16w": ["--model", str(chat_model_dir), "--dtype", "bf16-weights"],
                       "a8": ["--model", str(out), "--int8-activations"]}.items():
        r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", *args, "--prompt", "hello",
                            "--max-tokens", "8"], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        runs[name] = r.stdout
    assert runs["int8"] == runs["at-load"]  # the same int8 weights, whether written ahead or at load
    assert runs["a8"].strip()
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", "--model", str(chat_model_dir),
                        "--int8-activations", "--prompt", "x"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--int8-activations needs int8 or int4 weights" in r.stderr

    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors = load_file(str(out / index["weight_map"][key]))
    tensors[key + "_scale"] = tensors[key + "_scale"][:-1].contiguous()  # a mismatched scale
    save_file(tensors, str(out / index["weight_map"][key]))
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", "--model", str(out), "--prompt", "x"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and r.stderr.startswith("nanoseek generate: ") and len(r.stderr.strip().splitlines()) == 1
    assert key + "_scale" in r.stderr


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_broken_quantized_checkpoints_give_one_line_errors(dense_dir, tmp_path):
    out = tmp_path / "int8"
    assert quantize_cli(dense_dir, out, "int8", "--group-size", "32").returncode == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    shard_file = out / index["weight_map"][key]
    original = shard_file.read_bytes()

    tensors = load_file(str(shard_file))
    tensors[key + "_scale"] = tensors[key + "_scale"][:, :1].contiguous()  # another group size
    save_file(tensors, str(shard_file))
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(out)
    assert key + "_scale" in _one_line(e) and "group size" in str(e.value)

    tensors = load_file(str(out / index["weight_map"][key]))
    tensors[key] = tensors[key].float()  # a dense tensor where config.json promises int8
    save_file(tensors, str(shard_file))
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(out)
    assert "says int8" in _one_line(e)

    shard_file.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(out)
    assert "corrupt or truncated" in _one_line(e)
    shard_file.write_bytes(original)

    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["weight_format"] = "int3"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(out)
    assert "not a nanoseek weight format" in _one_line(e)


def test_bench_quant_reports_each_formats_heldout_accuracy(speedrun_quick, tmp_path, monkeypatch):
    """bench_quant --model DIR --task NAME: every format of a trained checkpoint is evaluated on the same
    held-out problems (here the quick speedrun's model, a few problems: the numbers only have to be real)."""
    from benchmarks import bench_quant, common
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.evaluate import evaluate

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    model_dir = speedrun_quick / "model"
    result = bench_quant.main(["--model", str(model_dir), "--task", "countdown", "--eval-n", "3", "--eval-k", "2",
                               "--rounds", "1", "--new-tokens", "2", "--no-profile"])
    assert json.loads((tmp_path / "quant_checkpoint.json").read_text())["formats"].keys() == bench_quant.FORMATS.keys()
    for fmt, r in result["formats"].items():
        assert r["heldout_task"] == "countdown" and r["heldout_n"] == 3 and r["heldout_k"] == 2, fmt
        assert 0 <= r["heldout_pass_at_1"] <= 1 and 0 <= r["heldout_format_rate"] <= 1 and "heldout_cons_at_2" in r
    # fp32's entry is exactly nanoseek eval's result on the dense model
    ref = evaluate(nanoseek.load(model_dir, dtype=torch.float32), load_tokenizer(model_dir), get_task("countdown"),
                   n=3, k=2)
    assert result["formats"]["fp32"]["heldout_format_rate"] == round(ref.format_rate, 4)
    with pytest.raises(SystemExit):
        bench_quant.main(["--task", "countdown"])  # random weights: refused
