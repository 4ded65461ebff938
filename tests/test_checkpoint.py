"""Unit tests of the training pieces: checkpoints (atomic layout, verification, pruning, RNG and optimizer
round trips), the LR schedule, weight-decay groups, the balancing sign rule, metrics truncation, dtype choice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from nanoseek.config import preset
from nanoseek.model import Transformer
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.balance import BiasBalancer, max_vio
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import read_metrics, truncate_metrics
from nanoseek.train.optim import build_optimizer, load_optimizer_state, lr_at, optimizer_state, param_groups


# Tiny tensors: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny model and its AdamW after two steps."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300))
    opt = build_optimizer(model, TrainConfig())
    x = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        model.forward_train(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_verify_load_roundtrip(trained, tmp_path):
    model, opt = trained
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = ckpt.save_checkpoint(tmp_path, 5, model, optimizer_state(model, opt), {"tokens": 123}, None, keep_last=3)
    expected = (torch.rand(3), np.random.rand(), random.random())
    assert path.name == "step_0000005" and ckpt.verify(path) is None
    assert not list(tmp_path.glob(".tmp-*"))
    model_state, optim_state, rng, state = ckpt.load_checkpoint(path)
    assert state == {"step": 5, "tokens": 123}
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v), k
    # A fresh model + optimizer restored from the checkpoint continue identically.
    fresh = Transformer(model.config)
    fresh.load_state_dict(model_state)
    opt2 = build_optimizer(fresh, TrainConfig())
    load_optimizer_state(fresh, opt2, optim_state)
    x = torch.randint(0, 300, (2, 16))
    for m, o in ((model, opt), (fresh, opt2)):
        m.forward_train(x, x).loss.backward()
        o.step()
        o.zero_grad()
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    ckpt.set_rng_state(rng)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_verify_detects_damage_and_latest_valid_skips(trained, tmp_path):
    model, opt = trained
    st = optimizer_state(model, opt)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, st, {"tokens": step}, None, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]  # keep_last
    f = tmp_path / "step_0000003" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    assert "bytes" in ckpt.verify(tmp_path / "step_0000003")
    (tmp_path / "step_0000004").mkdir()  # a folder without a manifest
    warnings = []
    assert ckpt.latest_valid(tmp_path, warn=warnings.append) == tmp_path / "step_0000002"
    assert len(warnings) == 2 and "no manifest" in warnings[0] and "step_0000003" in warnings[1]
    moved = ckpt.set_aside(tmp_path, 2)
    assert sorted(p.name for p in moved) == ["invalid-step_0000003", "invalid-step_0000004"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    m = tmp_path / "step_0000002" / ckpt.MANIFEST
    m.write_text(m.read_text()[:20])
    assert "unreadable manifest" in ckpt.verify(tmp_path / "step_0000002")


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, decay_frac=0.3)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:70])  # constant
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[70:], lrs[71:]))  # cosine down
    assert lr_at(5, TrainConfig(steps=10, lr=2.0, warmup_steps=0, decay_frac=0.0)) == 2.0


def test_no_weight_decay_on_norms_and_biases():
    model = Transformer(preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any("layernorm" in names[id(p)] for p in no_decay["params"])
    assert any("experts.gate_up_proj" in names[id(p)] for p in decay["params"])


def test_bias_sign_rule_after_optimizer_step():
    model = Transformer(preset("tiny"))
    layers = model.moe_layers()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bal = BiasBalancer(layers, speed=0.01)
    bal.attach(opt)
    E = model.config.n_routed_experts
    load = torch.arange(E, dtype=torch.float32)  # expert 0 underloaded ... expert E-1 overloaded
    for m in layers:
        m.load.copy_(load)
    opt.step()  # the post-hook runs the update
    bias = layers[0].gate.e_score_correction_bias
    assert bias[0] > 0 > bias[-1] and abs(float(bias.mean())) < 1e-7
    assert torch.equal(torch.sign(bias), torch.sign(load.mean() - load))
    assert all(float(m.load.sum()) == 0 for m in layers)  # reset for the next step
    assert bal.last_max_vio == pytest.approx(float(load.max() / load.mean() - 1))
    assert max_vio(torch.ones(2, 4)) == 0.0
    # Speed 0: loads are still measured, biases untouched.
    bal0 = BiasBalancer(layers, speed=0.0)
    before = bias.clone()
    for m in layers:
        m.load.copy_(load)
    bal0.step()
    assert torch.equal(bias, before) and bal0.last_max_vio > 0


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3, 4, 5]
    truncate_metrics(p, 3)
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3] and p.read_text().endswith("\n")


def test_autocast_choice(monkeypatch):
    from nanoseek import device

    cpu = torch.device("cpu")
    assert device.autocast_dtype("fp32", cpu) is None and device.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.autocast_dtype("auto", cpu) is None  # AVX2-only CPUs: bf16 matmuls are far slower
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.autocast_dtype("auto", cpu) is torch.bfloat16
    assert device.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
