"""The one optimizer step (nanoseek.train.step) every trainer uses: accumulation, metric averaging, the
NaN/inf guard (loss and gradient norm), clipping, frozen vs balancing routing biases."""

from __future__ import annotations

import copy

import pytest
import torch

from nanoseek.config import preset
from nanoseek.model import Transformer
from nanoseek.train.optim import OptimConfig
from nanoseek.train.step import NonFiniteLoss, TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = OptimConfig(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=128)).train()


def _loss(model):
    def fn(batch):
        out = model.forward_train(batch, batch, mtp_weight=0.3, aux_alpha=1e-4)
        return out.loss, {"loss": out.lm_loss, "mtp_loss": out.mtp_loss, "extra": 2.0}
    return fn


def test_micro_batches_average_to_the_full_batch():
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    a, b = _model(), _model()
    sa, sb = TrainStep(a, CFG, bias_update_speed=0.001), TrainStep(b, CFG, bias_update_speed=0.001)
    ra = sa(0, [x], _loss(a), tokens=64)
    rb = sb(0, [x[:2], x[2:]], _loss(b), tokens=64)
    # Equal-length micro-batches: the mean of their losses is the full batch's loss, and so are the gradients.
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["extra"] == ra["extra"] == 2.0
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert ra["tokens"] == rb["tokens"] == 64 and ra["lr"] == 1e-2 and list(ra)[:3] == ["loss", "mtp_loss", "extra"]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):  # AdamW's first moment = 0.1 x the gradient
        torch.testing.assert_close(sb.opt.state[q]["exp_avg"], sa.opt.state[p]["exp_avg"], rtol=1e-3, atol=1e-7,
                                   msg=n)
    assert all(p.grad is None for p in a.parameters())  # cleared after the step
    assert sa(1, [x], _loss(a), tokens=64)["tokens"] == 128


def test_non_finite_gradient_stops_before_the_update():
    model = _model()
    stepper = TrainStep(model, CFG, name="sft")
    before = copy.deepcopy(model.state_dict())
    handle = model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
    x = torch.randint(0, 128, (2, 16))
    with pytest.raises(NonFiniteLoss, match=r"sft: non-finite gradient norm \(.*\) at step 4") as e:
        stepper(3, [x], _loss(model))
    assert isinstance(e.value, FloatingPointError)  # what SFT and GRPO raised before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing applied
    assert all(p.grad is None for p in model.parameters())
    assert all(float(m.load.sum()) == 0 for m in model.moe_layers())
    handle.remove()
    assert stepper(4, [x], _loss(model))["grad_norm"] > 0  # and the next step goes on normally


def test_non_finite_loss_names_the_step_and_the_values():
    model = _model()
    stepper = TrainStep(model, CFG)

    def bad(batch):
        loss, metrics = _loss(model)(batch)
        return loss * float("nan"), {**metrics, "loss": metrics["loss"] * float("nan")}

    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step 8: loss=nan, mtp_loss="):
        stepper(7, [torch.randint(0, 128, (2, 16))], bad)


def test_frozen_routing_biases_are_measured_not_moved():
    x = torch.randint(0, 128, (4, 16))
    frozen, balanced = _model(), _model()
    rf = TrainStep(frozen, CFG, bias_update_speed=0.0)(0, [x], _loss(frozen))
    rb = TrainStep(balanced, CFG, bias_update_speed=0.01)(0, [x], _loss(balanced))
    assert rf["max_vio"] == pytest.approx(rb["max_vio"]) and rf["max_vio"] > 0
    assert all(float(m.gate.e_score_correction_bias.abs().sum()) == 0 for m in frozen.moe_layers())
    assert any(float(m.gate.e_score_correction_bias.abs().sum()) > 0 for m in balanced.moe_layers())
    assert all(float(m.load.sum()) == 0 for m in frozen.moe_layers() + balanced.moe_layers())


def test_clipping_and_the_schedule():
    model = _model()
    cfg = OptimConfig(lr=1.0, steps=4, warmup_steps=2, grad_clip=1e-3)
    stepper = TrainStep(model, cfg)
    x = torch.randint(0, 128, (2, 16))
    rec = stepper(0, [x], _loss(model))
    assert rec["lr"] == 0.5 and rec["grad_norm"] > 1e-3  # the norm before clipping is what is logged
    model.zero_grad()
    _loss(model)(x)[0].backward()
    gn = stepper.clip()
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert gn > 1e-3 and float(total) == pytest.approx(1e-3, rel=1e-3)


def test_sft_command_stops_on_a_non_finite_loss_with_one_line(chat_model_dir, tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "sft"
    argv = ["sft", "--model", str(chat_model_dir), "--data", "arithmetic", "--n", "8", "--steps", "3",
            "--batch-size", "4", "--lr", "1e30", "--warmup-steps", "0", "--no-progress", "--out", str(out),
            "--device", "cpu", "--threads", "1"]
    assert main(argv) == 1  # the run diverged: exit status 1, not 2 (bad input)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nanoseek sft: non-finite") and "at step" in err[-1] and "no model was written" in err[-1]
    assert not (out / "config.json").exists()
