"""`nanoseek train` end to end on configs/tiny.toml: outputs, exact resume after SIGKILL, corrupt-checkpoint
handling, balancing, NaN stop, config errors. Runs are real subprocesses of the CLI (one thread each, so two
can run side by side on a 2-core machine and results are reproducible)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
# Smaller corpus than the shipped config: data preparation is most of a 30-step run's time.
FAST = ["--set", "data.n_docs=600"]
COMPARED = ("loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "max_vio", "tokens")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nanoseek.cli", "train", "--config", str(TINY), "--out", str(out),
            "--no-progress", *FAST, *extra]


def train(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd(out, *extra), capture_output=True, text=True, env=ENV, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"nanoseek train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (ra["step"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted 30-step run: checkpoints every 10 steps, metrics every step."""
    out = tmp_path_factory.mktemp("train") / "base"
    train(out)
    return out


def test_tiny_run_outputs(baseline):
    import torch

    import nanoseek

    recs = metrics(baseline)
    assert [r["step"] for r in recs] == list(range(1, 31))
    for key in ("step", "loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "max_vio"):
        assert key in recs[-1]
    assert recs[-1]["tokens"] == 30 * 8 * 64
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0  # it learns
    assert recs[-1]["mtp_loss"] > 0 and recs[-1]["aux_loss"] > 0 and 0 < recs[-1]["mfu"] < 1
    for f in ("loss.png", "expert_load.png", "config.toml", "run_config.json", "tokenizer/tokenizer.json",
              "data/index.json"):
        assert (baseline / f).is_file(), f
    # The resolved config reloads as a config.
    from nanoseek.train.config import load_run_config

    assert load_run_config(baseline / "config.toml").train.steps == 30
    # keep_last = 2; every checkpoint and the export are HF directories with the tokenizer.
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]
    tok = json.loads((baseline / "run_config.json").read_text())["model_resolved"]["vocab_size"]
    for d in (baseline / "final", baseline / "checkpoints" / "step_0000020"):
        assert (d / "tokenizer.json").is_file()
        model = nanoseek.load(d)
        assert model.config.vocab_size == tok < 512  # the tokenizer's real size, not the requested one
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, tok)


def test_resume_after_sigkill_is_exact(baseline, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 240
    try:
        # Kill mid-run, after the step-10 checkpoint and a few steps beyond it.
        while time.time() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if (out / "checkpoints" / "step_0000010").is_dir() and m.exists() and \
                    any(json.loads(x)["step"] >= 13 for x in m.read_text().splitlines()[:-1]):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    p = train(out, "--resume")
    assert "resumed from" in p.stderr
    assert_same_run(metrics(baseline), metrics(out))


def test_corrupt_and_partial_checkpoints_are_skipped(baseline, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(baseline, out)
    ckpts = out / "checkpoints"
    # The newest checkpoint has a damaged weight file; a newer one is a half-written folder.
    f = ckpts / "step_0000030" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    (ckpts / "step_0000040").mkdir()
    (ckpts / "step_0000040" / "config.json").write_text("{}")
    (ckpts / ".tmp-step_0000050-123").mkdir()
    p = train(out, "--resume")
    assert "skipping checkpoint" in p.stderr and "step_0000040" in p.stderr and "step_0000030" in p.stderr
    assert "sha256" in p.stderr and "step 20" in p.stderr
    # Steps 21-30 were retrained from step 20 and match the original run.
    assert_same_run(metrics(baseline), metrics(out))
    assert sorted(x.name for x in ckpts.iterdir()) == [
        "invalid-step_0000030", "invalid-step_0000040", "step_0000020", "step_0000030"]


def test_balancing_lowers_max_vio(tmp_path):
    """Aux-loss-free balancing at the paper's speed (0.001) against none, 40 steps each, side by side."""
    runs = {}
    for speed in ("0.001", "0"):
        out = tmp_path / f"bal{speed}"
        runs[speed] = (out, subprocess.Popen(cmd(out, "--set", "train.steps=40", "--set", "train.save_every=0",
                                                 "--set", "train.log_every=1", "--set", f"moe.bias_update_speed={speed}"),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV))
    vio = {}
    for speed, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        v = [r["max_vio"] for r in metrics(out)][20:]
        vio[speed] = sum(v) / len(v)
    assert vio["0.001"] < 0.95 * vio["0"], vio


def test_nan_loss_stops_cleanly(tmp_path):
    out = tmp_path / "nan"
    p = train(out, "--set", "train.lr=1e30", "--set", "train.save_every=1", "--set", "train.warmup_steps=0",
              check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "non-finite" in p.stderr
    import re

    step = int(re.search(r"at step (\d+)", p.stderr).group(1))
    saved = [int(x.name.split("_")[1]) for x in (out / "checkpoints").glob("step_*")]
    assert saved and max(saved) < step  # checkpoints before the bad step only
    assert not (out / "final").exists()
    assert all(r["step"] < step for r in metrics(out))


# ----------------------------------------------------------------------------- config errors (in process)
def run_cli(tmp_path: Path, config: Path, *sets: str) -> int:
    """`nanoseek train` in process, through the one entry point that turns its errors into one line."""
    from nanoseek.cli import main

    argv = ["train", "--config", str(config), "--out", str(tmp_path / "out"), "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    return main(argv)


@pytest.mark.parametrize("sets, message", [
    (["train.stepz=3"], "unknown key"),
    (["nosuch.key=1"], "unknown section"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["train.steps=-1"], "train.steps must be >= 1"),
    (["train.dtype=fp16"], "train.dtype must be one of"),
    (["model.hidden_sise=64"], "unknown model field"),
    (["model.preset=huge"], "unknown preset"),
    (["train.steps"], "expected section.key=value"),
    (["train.batch_size=8", "train.micro_batch_size=3"], "multiple of train.micro_batch_size"),
])
def test_bad_overrides(tmp_path, capsys, sets, message):
    assert run_cli(tmp_path, TINY, *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek train: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("text, message", [
    ("[train]\nsteps = 3\nsteps = 4\n", "not valid TOML"),
    ("[train\n", "not valid TOML"),
    ("[train]\nlr = \"fast\"\n", "train.lr must be float"),
    ("[train]\nwarmup = 3\n", "unknown key train.warmup"),
    ("[optimizer]\nlr = 1.0\n", "unknown section"),
    ("[model]\npreset = \"tiny\"\nn_group = 3\n", "divisible by n_group"),
])
def test_bad_toml(tmp_path, capsys, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert run_cli(tmp_path, f) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.toml" in err, err


def test_missing_config_file(tmp_path, capsys):
    assert run_cli(tmp_path, tmp_path / "nope.toml") == 2
    assert "no such config file" in capsys.readouterr().err


def test_overrides_are_typed():
    from nanoseek.train.config import load_run_config

    cfg = load_run_config(TINY, ["train.steps=7", "train.lr=1", "moe.bias_update_speed=0", "fp8.enabled=true",
                                 "data.source=/some/dir", "model.hidden_size=32", "parallel.ep=2"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.moe.bias_update_speed == 0.0 and cfg.fp8.enabled is True and cfg.parallel.ep == 2
    assert cfg.data.source == "/some/dir" and cfg.model_config().hidden_size == 32
    assert cfg.mtp.loss_weight == 0.3 and cfg.moe.seq_aux_alpha == 1e-4 and cfg.train.weight_decay == 0.1
