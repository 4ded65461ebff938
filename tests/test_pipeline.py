"""Pipeline parallelism (nanoseek.train.pipeline): real `nanoseek train` runs under torchrun (gloo on CPU)
equal to one process, per schedule and composed with expert parallelism; exact resume after SIGKILL; the
per-stage checkpoints and final/ as HF directories; and the pieces (layer plan, config errors, stage modules
chained by hand equal to the model) in one process.

Every run is the tiny config in fp32 with MTP and balancing on (bias_update_speed 1e-3, seq-aux alpha 1e-4),
10 steps of 8 x 64 tokens in 4 micro-batches of 2 rows (DualPipeV needs as many micro-batches as stages).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
BIN = Path(sys.executable).parent
STEPS = 10
COMMON = ["--no-progress", "--set", "data.n_docs=600", "--set", f"train.steps={STEPS}", "--set", "train.dtype=fp32",
          "--set", "train.micro_batch_size=2", "--set", "train.save_every=5", "--set", "moe.bias_update_speed=0.001",
          "--set", "moe.seq_aux_alpha=0.0001", "--set", "mtp.loss_weight=0.3"]
COMPARED = ("loss", "mtp_loss", "aux_loss", "grad_norm", "max_vio", "lr", "tokens")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
TIMEOUT = 600


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out: Path, nproc: int, *extra: str) -> list[str]:
    nanoseek = shutil.which("nanoseek", path=str(BIN)) or str(BIN / "nanoseek")
    head = [nanoseek] if nproc == 1 else [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr",
                                          "127.0.0.1", "--master_port", str(_port()), "--no-python", nanoseek]
    return [*head, "train", "--config", str(TINY), "--out", str(out), *COMMON, *extra]


def _train(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(out, nproc, *extra), capture_output=True, text=True, env=ENV, timeout=TIMEOUT, cwd=ROOT)
    assert p.returncode == 0, f"nanoseek train failed ({p.returncode}):\n{p.stderr[-6000:]}"
    return p


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(ref: list[dict], got: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        for k in COMPARED:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=rel), (a["step"], k, a[k], b[k])


def assert_same_weights(ref_dir: Path, got_dir: Path) -> None:
    import nanoseek

    a, b = nanoseek.load(ref_dir).state_dict(), nanoseek.load(got_dir).state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp") / "single"
    _train(out, 1)
    return out


_RUNS: dict[str, Path] = {}


def _pp_run(tmp_path_factory, schedule: str) -> Path:
    if schedule not in _RUNS:
        out = tmp_path_factory.mktemp("pp") / schedule
        p = _train(out, 2, "--set", "parallel.pp=2", "--set", f"parallel.pp_schedule={schedule}")
        assert f"pipeline: pp=2 x dp=1 (ep=1), {schedule}" in p.stderr
        _RUNS[schedule] = out
    return _RUNS[schedule]


# ----------------------------------------------------------------------------- real runs under torchrun
@pytest.mark.parametrize("schedule", [
    "1F1B", "DualPipeV",  # the default suite: one plain and one V-shaped schedule; the others in `make test-slow`
    pytest.param("Interleaved1F1B", marks=pytest.mark.slow),
    pytest.param("ZBVZeroBubble", marks=pytest.mark.slow),
])
def test_pp2_matches_one_process(single, tmp_path_factory, schedule):
    out = _pp_run(tmp_path_factory, schedule)
    assert_same_run(_metrics(single), _metrics(out))
    assert_same_weights(single / "final", out / "final")
    # Each pipeline rank wrote its own shard of every checkpoint and of final/.
    for d in (out / "final", out / "checkpoints" / "step_0000010"):
        assert sorted(p.name for p in d.glob("model-*.safetensors")) == \
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000010").glob("optimizer*")) == \
        ["optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors"]


def test_final_dir_loads_in_transformers(single, tmp_path_factory):
    """final/ of a pipelined run is one HF directory: transformers gives the logits nanoseek gives."""
    transformers = pytest.importorskip("transformers")
    import nanoseek

    final = _pp_run(tmp_path_factory, "1F1B") / "final"
    ours = nanoseek.load(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_pp_checkpoint_resumes_in_one_process(single, tmp_path_factory, tmp_path):
    """A per-stage checkpoint is an ordinary checkpoint: one process resumes step 5 of a pp=2 run exactly."""
    src = _pp_run(tmp_path_factory, "1F1B")
    out = tmp_path / "one"
    shutil.copytree(src, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step_0000010")
    p = _train(out, 1, "--resume")
    assert "resumed from" in p.stderr and "(step 5)" in p.stderr
    assert_same_run(_metrics(single), _metrics(out))


@pytest.mark.slow
def test_resume_after_sigkill_under_pp2(single, tmp_path_factory, tmp_path):
    ref = _pp_run(tmp_path_factory, "DualPipeV")
    out = tmp_path / "killed"
    extra = ("--set", "parallel.pp=2", "--set", "parallel.pp_schedule=DualPipeV")
    proc = subprocess.Popen(_cmd(out, 2, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            cwd=ROOT, start_new_session=True)
    deadline = time.time() + TIMEOUT
    try:
        # Kill every process of the job mid-run, after the step-5 checkpoint and a step beyond it.
        while time.time() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if (out / "checkpoints" / "step_0000005").is_dir() and m.exists() and \
                    any(json.loads(x)["step"] >= 7 for x in m.read_text().splitlines()[:-1]):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not (out / "final").exists()
    p = _train(out, 2, *extra, "--resume")
    assert "resumed from" in p.stderr
    assert_same_run(_metrics(ref), _metrics(out), rel=1e-6)
    assert_same_weights(ref / "final", out / "final")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1F1B", "DualPipeV"])
def test_pp2_ep2_matches_one_process(single, tmp_path, schedule):
    """4 processes: 2 stages x (EP over the 2 ranks of each stage; FSDP2 over them for 1F1B)."""
    out = tmp_path / schedule
    p = _train(out, 4, "--set", "parallel.pp=2", "--set", "parallel.ep=2", "--set", f"parallel.pp_schedule={schedule}")
    assert f"pipeline: pp=2 x dp=2 (ep=2), {schedule}" in p.stderr
    assert_same_run(_metrics(single), _metrics(out))
    assert_same_weights(single / "final", out / "final")


# ----------------------------------------------------------------------------- one process: the pieces
def test_layer_plans_and_stage_placement():
    from nanoseek.train.pipeline_plan import layer_counts, make_plan

    assert layer_counts(61, 16) == [4] * 13 + [3] * 3
    assert layer_counts(3, 4) == [1, 1, 1, 0]
    p = make_plan(8, 2, "1F1B")
    assert p.layers == ((0, 1, 2, 3), (4, 5, 6, 7)) and p.rank_of == (0, 1)
    p = make_plan(8, 2, "Interleaved1F1B")
    assert p.rank_of == (0, 1, 0, 1) and p.stages_of(0) == [0, 2]
    p = make_plan(8, 2, "DualPipeV", given=[1, 3, 3, 1])
    assert p.rank_of == (0, 1, 1, 0) and p.stages_of(0) == [0, 3]  # first and last stage on one rank
    assert p.layers == ((0,), (1, 2, 3), (4, 5, 6), (7,))
    p = make_plan(16, 4, "ZBVZeroBubble")
    assert p.rank_of == (0, 1, 2, 3, 3, 2, 1, 0)


def test_every_schedule_exists_in_this_torch():
    from nanoseek.train.pipeline_plan import SCHEDULES, schedule_class

    for name, cls in SCHEDULES.items():
        assert schedule_class(name).__name__ == cls


@pytest.mark.parametrize("sets, message", [
    (["parallel.pp_schedule=GPipe"], "parallel.pp_schedule must be one of"),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2"], "1F1B runs one stage per rank"),
    (["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_virtual_stages=3"],
     "needs exactly 2 stages per rank"),
    (["parallel.pp=2", "parallel.pp_layers=[2, 2]"], "must be counts >= 0 adding up to num_hidden_layers=3"),
    (["parallel.pp=2", "parallel.pp_layers=[3]"], "has 1 entries but there are 2 stages"),
    (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_layers=[1, 0, 1, 1]"],
     "stage 1 of 4 would hold no decoder layer"),
    (["parallel.pp=0"], "parallel.pp must be >= 1"),
])
def test_config_errors(sets, message):
    from nanoseek.train.config import load_run_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_run_config(TINY, sets)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets, world, message", [
    (["parallel.pp=2"], 3, "parallel.pp=2 must divide the number of processes"),
    (["parallel.pp=2", "parallel.ep=4"], 4, "parallel.ep=4 must divide the data-parallel ranks of a stage"),
    (["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_microbatches=2"], 2,
     "DualPipeV needs at least 4 micro-batches"),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], 2, "must split into parallel.pp_microbatches=3"),
])
def test_layout_errors(sets, world, message):
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pipeline_plan import microbatches

    cfg = load_run_config(TINY, sets)
    with pytest.raises(ConfigError, match=message):
        microbatches(cfg, world)


def test_microbatch_count_follows_the_schedule():
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pipeline_plan import microbatches

    n, note = microbatches(load_run_config(TINY, ["parallel.pp=2", "train.micro_batch_size=2"]), 2)
    assert (n, note) == (4, "")
    # tiny.toml's micro_batch_size 4 gives 1 per rank at dp=2; DualPipeV needs 4: said, not silent.
    n, note = microbatches(load_run_config(TINY, ["parallel.pp=2", "parallel.pp_schedule=DualPipeV"]), 4)
    assert n == 4 and "train.micro_batch_size=4 would give 1" in note and "DualPipeV needs at least 4" in note


def test_stage_modules_chained_equal_the_model():
    """The stage modules of a V-shaped 4-stage plan, run one after the other in one process, give the model's
    losses and gradients exactly (same operations in the same order; the MTP embedding is the model's)."""
    from nanoseek.config import preset
    from nanoseek.model import Transformer
    from nanoseek.train.pipeline import StageModule
    from nanoseek.train.pipeline_plan import make_plan

    torch.manual_seed(0)
    model = Transformer(preset("tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, 3] = -100  # an ignored target is ignored the same way
    ref = model.forward_train(x, y, mtp_weight=0.3, aux_alpha=1e-4)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = [m.load.clone() for m in model.moe_layers()]
    model.zero_grad(set_to_none=True)
    model.reset_load()

    plan = make_plan(3, 2, "DualPipeV")
    stages = [StageModule(model, s, plan, 1e-4, None) for s in range(plan.n_stages)]
    out = stages[0](x, ids=x)
    for st in stages[1:]:
        out = st(*out, ids=x)
    logits, *mtp, aux = out
    got = Transformer.train_losses(logits, mtp, y, aux.sum(), 0.3)
    assert got.loss.item() == ref.loss.item() and got.mtp_loss.item() == ref.mtp_loss.item()
    assert got.aux_loss.item() == ref.aux_loss.item()
    got.loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, want[n]), n
    for a, m in zip(loads, model.moe_layers()):
        assert torch.equal(a, m.load)


def test_balancer_with_layers_held_elsewhere():
    """A stage's balancer fills its rows of the model's [L, E] load table; max_vio is over the whole table."""
    from nanoseek.config import preset
    from nanoseek.model import Transformer
    from nanoseek.train.balance import BiasBalancer, max_vio

    model = Transformer(preset("tiny"))
    a, b, c = model.moe_layers()
    b.load += torch.arange(8.0)
    others = torch.tensor([[2.0] * 8, [0.0] * 8, [1.0, 3.0] * 4])  # what the other stages' ranks add
    bal = BiasBalancer([None, b, None], 0.1, all_reduce_sum=lambda t: t.add_(others))
    bal.step()
    table = torch.stack([others[0], torch.arange(8.0), others[2]])
    assert torch.equal(bal.last_loads, table) and bal.last_max_vio == pytest.approx(max_vio(table))
    assert torch.all(b.gate.e_score_correction_bias[:4] > 0) and torch.all(b.gate.e_score_correction_bias[4:] < 0)
    assert not a.gate.e_score_correction_bias.any() and not b.load.any()
