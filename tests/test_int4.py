"""int4 weights (nanoseek.infer.quant): the packing, the error bound, the modules against their dequantized
fp32 twins, and an int4 checkpoint through `nanoseek quantize`, `nanoseek.load` and `nanoseek generate`.

The kernels themselves are checked against torch for every instruction set in tests/test_quant.py (its
format lists include int4).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_quant import quantize_cli, tiny_model

import nanoseek
from nanoseek.config import preset
from nanoseek.hf import CheckpointError
from nanoseek.infer import fast, quant
from nanoseek.infer.fast import kernels
from nanoseek.model import Transformer
from nanoseek.model.moe import GroupedExperts


def test_pack_unpack_every_value_and_the_layout():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # all 16 values, [3, 32]
    p = quant.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(quant.unpack_int4(p), q)
    # input 2j in the low nibble of byte j, two's complement: (1, -1) -> 0xF1
    assert quant.pack_int4(torch.tensor([1, -1], dtype=torch.int8)).item() == 0xF1


@pytest.mark.parametrize("shape,group", [((64, 256), 32), ((40, 96), 128), ((8, 6), 0), ((3, 5, 64), 16)])
def test_quantize_error_is_at_most_half_a_step(shape, group):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 3  # rows of different ranges
    w[..., 0, :] = 0  # an all-zero row: any scale is exact
    q, s = quant.quantize_int4(w, group)
    K = shape[-1]
    G = K // group if group and K % group == 0 else 1  # a group that does not divide: one scale per row
    assert q.shape == (*shape[:-1], K // 2) and s.shape == (*shape[:-1], G) and s.dtype == torch.float32
    values = quant.unpack_int4(q)
    assert values.min() >= -7 and values.max() <= 7  # symmetric: -8 is never written
    step = s.repeat_interleave(K // G, dim=-1)
    err = (w - quant.dequantize(q, s)).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()
    assert (quant.dequantize(q, s)[..., 0, :] == 0).all()


def test_int4_needs_even_rows_and_groups():
    with pytest.raises(ValueError, match="row of 7 inputs .odd. cannot be int4"):
        quant.quantize_int4(torch.randn(4, 7))
    with pytest.raises(ValueError, match="even number of inputs so each starts on a byte, got 3"):
        quant.quantize_int4(torch.randn(4, 12), 3)
    model = Transformer(preset("tiny", moe_intermediate_size=33))
    with pytest.raises(ValueError) as e:
        quant.quantize_model(model, "int4")
    assert str(e.value).startswith("layers.1.mlp.experts: ") and "33 inputs" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("group", [32, 0])
def test_quant_linear_equals_the_dequantized_linear(group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    q = quant.QuantLinear.from_linear(lin, "int4", group)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (96, 128)
    assert q.weight_scale.shape == (96, 256 // group if group else 1)
    dense = q.dense_weight()
    assert (dense - lin.weight).abs().max() <= q.weight_scale.max() / 2 * (1 + 1e-5)
    kernels.PATHS.clear()
    with torch.no_grad():
        for rows in (1, 5, 40):  # kernel-or-torch (measured) for a few rows, torch's path for many
            x = torch.randn(rows, 256)
            torch.testing.assert_close(q(x), F.linear(x, dense), rtol=1e-4, atol=1e-4)
            with kernels.disabled():
                torch.testing.assert_close(q(x), F.linear(x, dense), rtol=1e-4, atol=1e-4)
    if kernels.load() is not None:  # the few-row calls were measured under the int4 format's own key
        assert {e["key"][0] for e in kernels.PATHS.table()} == {"int4"}
    kernels.PATHS.clear()


def test_quant_experts_equal_the_dequantized_experts():
    torch.manual_seed(0)
    E, D, Fh = 6, 64, 48
    cfg = preset("tiny", hidden_size=D, moe_intermediate_size=Fh)
    ex = GroupedExperts(cfg, E)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1), ex.down_proj.normal_(0, 0.1)
    q = quant.QuantExperts.from_experts(ex, "int4", 16)
    assert q.gate_up_proj.shape == (E, 2 * Fh, D // 2) and q.down_proj_scale.shape == (E, D, Fh // 16)
    ref = GroupedExperts(cfg, E)
    with torch.no_grad():
        ref.gate_up_proj.copy_(quant.dequantize(q.gate_up_proj, q.gate_up_proj_scale))
        ref.down_proj.copy_(quant.dequantize(q.down_proj, q.down_proj_scale))
    counts = torch.tensor([3, 0, 1, 4, 0, 2])
    x = torch.randn(int(counts.sum()), D)
    with torch.no_grad():
        want = ref(x, counts)
        torch.testing.assert_close(q(x, counts), want, rtol=1e-4, atol=1e-5)
        with kernels.disabled():  # one expert dequantized at a time
            torch.testing.assert_close(q(x, counts), want, rtol=1e-4, atol=1e-5)
        idx, gate = torch.tensor([[0, 3], [5, 2], [3, 0]]), torch.rand(3, 2)
        routed = q.routed_rows(x[:3], gate, idx)
        if kernels.load() is not None:  # off the kernels routed_rows declines (None) and MoE sorts instead
            one = [[ref(x[n: n + 1], F.one_hot(idx[n, k], E))[0] for k in range(2)] for n in range(3)]
            want = torch.stack([gate[n, 0] * one[n][0] + gate[n, 1] * one[n][1] for n in range(3)])
            torch.testing.assert_close(routed, want, rtol=1e-4, atol=1e-5)


def dequantized_twin(dense: Transformer, q: Transformer) -> Transformer:
    """`dense` with every weight q quantized replaced by what q's narrow weight stands for."""
    twin, modules = copy.deepcopy(dense), dict(dense.named_modules())
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, quant.QuantLinear):
                twin_modules[name].weight.copy_(m.dense_weight())
            elif isinstance(m, quant.QuantExperts):
                twin_modules[name].gate_up_proj.copy_(quant.dequantize(m.gate_up_proj, m.gate_up_proj_scale))
                twin_modules[name].down_proj.copy_(quant.dequantize(m.down_proj, m.down_proj_scale))
            else:
                continue
            assert type(modules[name]) is not type(m)
    return twin


def test_int4_model_equals_its_dequantized_twin_and_tracks_fp32():
    dense, q = tiny_model(), quant.quantize_model(tiny_model(), "int4")
    assert q.weight_format == {"format": "int4", "group_size": 32}
    assert q.layers[1].mlp.experts.gate_up_proj.dtype == torch.uint8
    assert type(q.layers[0].self_attn.kv_b_proj) is torch.nn.Linear  # the same exclusions as int8
    twin = dequantized_twin(dense, q)
    for m in (dense, q, twin):
        fast.accelerate(m)
    ids = torch.randint(0, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got, want = dense(ids), q(ids), twin(ids)
    # The format is exact to what it stores: only fp32 rounding apart from the dequantized fp32 model ...
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    assert nanoseek.generate(q, [ids[0].tolist()], max_new_tokens=12) == \
        nanoseek.generate(twin, [ids[0].tolist()], max_new_tokens=12)
    # ... and 16 levels a group are coarse: on this random-weight model (where int8 errs ~2% and agrees on
    # ~96% of the argmaxes) int4 stays within a bound far from noise (benchmarks/bench_quant.py measures it).
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.75
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", *args, "--prompt", "hello",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_int4_checkpoint_through_the_cli(chat_model_dir, tmp_path):
    out = tmp_path / "int4"
    r = quantize_cli(chat_model_dir, out, "int4", "--max-shard-gb", "0.0005")
    assert r.returncode == 0, r.stderr
    assert "int4 weights" in r.stdout
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["weight_format"] == "int4" and qcfg["group_size"] == 32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    tensors = load_file(str(out / index["weight_map"][key]))
    assert tensors[key].dtype == torch.uint8 and tensors[key + "_scale"].dtype == torch.float32

    loaded = nanoseek.load(out)
    at_load = nanoseek.load(chat_model_dir, weights="int4")  # converted while loading: the same tensors
    assert loaded.weight_format == at_load.weight_format == {"format": "int4", "group_size": 32}
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, at_load.state_dict()[name]), name
    dense = nanoseek.load(chat_model_dir)
    ids = torch.randint(0, dense.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expanded = nanoseek.load(out, weights="dense")(ids)  # the int4 values, dequantized while loading
        assert ((loaded(ids) - expanded).abs().max() / expanded.abs().max()).item() < 1e-4
        as_int8 = nanoseek.load(out, weights="int8")(ids)  # requantized: int8's error on top of int4's
        assert ((as_int8 - expanded).abs().max() / expanded.abs().max()).item() < 0.05
        ref = dense(ids)
        assert ((expanded - ref).abs().max() / ref.abs().max()).item() < 0.75  # int4's own error: see above

    runs = {name: _generate("--model", *args) for name, args in
            {"int4": [str(out)], "at-load": [str(chat_model_dir), "--dtype", "int4"]}.items()}
    for r in runs.values():
        assert r.returncode == 0, r.stderr
    assert runs["int4"].stdout == runs["at-load"].stdout  # the same int4 weights, written ahead or at load

    tensors[key + "_scale"] = tensors[key + "_scale"][:, :1].contiguous()  # another group size
    save_file(tensors, str(out / index["weight_map"][key]))
    r = _generate("--model", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert key + "_scale" in r.stderr and "group size" in r.stderr
    odd = tensors[key + "_scale"].repeat(1, tensors[key].shape[1] * 2)  # groups of one input: mid-byte
    tensors[key + "_scale"] = odd.contiguous()
    save_file(tensors, str(out / index["weight_map"][key]))
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(out)
    assert "not an fp32 [rows, groups] scale" in str(e.value) and "\n" not in str(e.value)


def test_quantize_cli_refuses_what_int4_cannot_hold(tmp_path):
    src = tmp_path / "odd"
    nanoseek.save(Transformer(preset("tiny", moe_intermediate_size=33)), src)
    r = quantize_cli(src, tmp_path / "out", "int4")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "33 inputs" in r.stderr
    r = quantize_cli(src, tmp_path / "out", "int4", "--group-size", "5")
    assert r.returncode == 1 and "even number of inputs" in r.stderr
    r = quantize_cli(src, tmp_path / "out", "bf16", "--group-size", "32")
    assert r.returncode == 1 and "no scales" in r.stderr
    assert nanoseek.load(src, weights="int8") is not None  # int8 holds any row
    with pytest.raises(CheckpointError, match="33 inputs"):
        nanoseek.load(src, weights="int4")
