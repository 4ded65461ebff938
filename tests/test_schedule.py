"""The learning-rate schedule shared by every trainer, and what a resumed run does when its schedule
changes (train.schedule_on_extend): unit checks of the curves, then real `nanoseek train` runs extended
from a finished run, including an extended run that is itself interrupted and resumed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.train.schedule import Schedule, resume_schedule

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_the_three_shapes():
    # Pretraining: warm-up, constant, cosine over the last 30%.
    s = Schedule(lr=1.0, steps=100, warmup_steps=10, decay_frac=0.3, min_lr=0.1)
    lrs = [s(i) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and set(lrs[10:70]) == {1.0}
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[70:], lrs[71:]))
    # SFT (decay_frac 1): the cosine starts right after the warm-up.
    s = Schedule(lr=2.0, steps=20, warmup_steps=4, decay_frac=1.0, min_lr=0.2)
    for i in range(4, 20):
        frac = (i - 4) / (20 - 1 - 4)
        assert s(i) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * frac)))
    # GRPO (decay_frac 0): warm-up, then constant to the end.
    s = Schedule(lr=3.0, steps=10, warmup_steps=2)
    assert [s(i) for i in range(10)] == [1.5] + [3.0] * 9


def test_unchanged_schedule_keeps_the_saved_one():
    ext = Schedule(lr=1.0, steps=80, warmup_steps=5, decay_frac=0.3, min_lr=0.1, extended_at=40, extended_lr=0.1)
    again, msg = resume_schedule(ext, Schedule(lr=1.0, steps=80, warmup_steps=5, decay_frac=0.3, min_lr=0.1), 60,
                                 "continue")
    assert again == ext and msg is None  # the extension record survives a plain resume
    assert Schedule.from_dict(json.loads(json.dumps(ext.to_dict()))) == ext
    assert resume_schedule(None, ext, 3, "rewarm") == (ext, None)
    with pytest.raises(ValueError, match="schedule_on_extend"):
        resume_schedule(ext, ext, 0, "restart")


def test_extending_a_finished_run():
    old = Schedule(lr=1.0, steps=40, warmup_steps=5, decay_frac=0.3, min_lr=0.1)
    new = Schedule(lr=1.0, steps=80, warmup_steps=5, decay_frac=0.3, min_lr=0.1)
    assert new(40) == 1.0  # recomputing the shape alone would jump back to the peak
    cont, msg = resume_schedule(old, new, 40, "continue")
    assert "train.steps 40 -> 80" in msg and "stays at min_lr" in msg and '"continue"' in msg
    assert all(cont(i) == pytest.approx(0.1) for i in range(40, 80))  # a finished decay stays at min_lr
    warm, msg = resume_schedule(old, new, 40, "rewarm")
    assert "new warm-up" in msg and '"rewarm"' in msg
    lrs = [warm(i) for i in range(40, 80)]
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5])) and lrs[4] == 1.0  # back up to the peak over 5 steps
    assert lrs[-1] == pytest.approx(0.1) and lrs[0] > 0.1


def test_extending_mid_decay_and_before_the_decay():
    old = Schedule(lr=1.0, steps=100, warmup_steps=10, decay_frac=0.3, min_lr=0.1)
    new = Schedule(lr=1.0, steps=200, warmup_steps=10, decay_frac=0.3, min_lr=0.1)
    cont, msg = resume_schedule(old, new, 85, "continue")
    lrs = [cont(i) for i in range(85, 200)]
    assert lrs[0] == old(85) and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    assert "continues its decay from" in msg
    # Extended in the constant phase: nothing to continue, the decay moves to the end of the new total.
    cont, msg = resume_schedule(old, new, 50, "continue")
    assert cont == new and "had not begun" in msg
    # A second extension of an extension starts from where the first had brought the LR.
    first, _ = resume_schedule(old, new, 85, "continue")
    second, _ = resume_schedule(first, Schedule(lr=1.0, steps=300, warmup_steps=10, decay_frac=0.3, min_lr=0.1),
                                150, "continue")
    assert second(150) == first(150) and second(299) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- real runs
def _train(out: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nanoseek.cli", "train", "--config", str(ROOT / "configs" / "tiny.toml"),
           "--out", str(out), "--no-progress", "--set", "data.n_docs=300", "--set", "train.save_every=2",
           "--set", "train.warmup_steps=2", *[a for s in sets for a in ("--set", s)]] + (["--resume"] if resume else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_cli_extension_says_what_it_does_and_resumes_exactly(tmp_path):
    base = tmp_path / "base"
    _train(base, "train.steps=6")
    cont, warm = tmp_path / "cont", tmp_path / "warm"
    shutil.copytree(base, cont)
    shutil.copytree(base, warm)
    p = _train(cont, "train.steps=10", resume=True)
    assert "schedule changed on resume at step 6 (train.steps 6 -> 10)" in p.stderr
    assert "stays at min_lr" in p.stderr
    lrs = _lrs(cont)
    assert all(lrs[s] == pytest.approx(3e-4) for s in range(7, 11))  # the finished decay stays at min_lr
    p = _train(warm, "train.steps=10", "train.schedule_on_extend=rewarm", resume=True)
    assert "new warm-up" in p.stderr
    lrs = _lrs(warm)
    assert lrs[7] > lrs[6] and lrs[8] == pytest.approx(3e-3) and lrs[10] == pytest.approx(3e-4)
    # Interrupt the extended run after its step-8 checkpoint: resuming reproduces steps 9-10 exactly.
    again = tmp_path / "again"
    shutil.copytree(warm, again)
    shutil.rmtree(again / "final")
    shutil.rmtree(again / "checkpoints" / "step_0000010")
    p = _train(again, "train.steps=10", "train.schedule_on_extend=rewarm", resume=True)
    assert "resumed from" in p.stderr and "schedule changed" not in p.stderr
    a, b = [list(map(json.loads, (d / "metrics.jsonl").read_text().splitlines())) for d in (warm, again)]
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
