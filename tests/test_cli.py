"""The command line's shared behaviour (nanoseek.cli): one-line errors with exit status 2 for the project's
own errors (real commands, as subprocesses, for every case a new user meets: a missing path, a file for a
directory, a run folder for its model, a corrupt config.json, resuming with another model, a port in use),
tracebacks for real bugs and under --debug, --device and --threads on every command that runs a model,
help for every flag with its default, --version, and a reader that closes the pipe early."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.errors import NanoseekError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
PY = [sys.executable, "-m", "nanoseek.cli"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# The commands that run a model, with the arguments each needs besides --model (or --teacher).
MODEL_COMMANDS = {
    "generate": ["--prompt", "hi"],
    "chat": [],
    "serve": ["--port", "0"],
    "eval": ["--task", "countdown"],
    "sft": ["--data", "countdown", "--out", "{tmp}/sft"],
    "grpo": ["--out", "{tmp}/grpo"],
    "distill": ["--task", "countdown", "--student-config", "tiny", "--out", "{tmp}/student"],
}


def nanoseek(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(PY + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, input=input,
                          env={**os.environ, **ENV}, timeout=600)


def one_line(r: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed command (after the info lines a command may print first)."""
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("nanoseek: loaded")]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"nanoseek {command}: "), r.stderr
    return lines[0]


def model_args(command: str, model: Path | str, tmp: Path) -> list[str]:
    flag = "--teacher" if command == "distill" else "--model"
    return [command, flag, str(model)] + [a.format(tmp=tmp) for a in MODEL_COMMANDS[command]]


# ----------------------------------------------------------------------------- bad paths, for real
@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_missing_model_is_one_line_after_device_cpu_is_accepted(command, tmp_path):
    """Every model command accepts --device cpu (and --threads) and then names the missing path."""
    r = nanoseek(*model_args(command, tmp_path / "nope", tmp_path), "--device", "cpu", "--threads", "1")
    line = one_line(r, command)
    assert f"no such model directory ({tmp_path / 'nope'})" in line and "check the path" in line


def test_a_file_for_the_model_directory(speedrun_quick, tmp_path):
    config = speedrun_quick / "model" / "config.json"
    line = one_line(nanoseek("generate", "--model", config, "--prompt", "hi"), "generate")
    assert line == (f"nanoseek generate: a file, not a model directory ({config}): pass the folder that holds it: "
                    f"{config.parent}")


def test_a_run_folder_for_its_model(speedrun_quick, tmp_path):
    line = one_line(nanoseek("chat", "--model", speedrun_quick), "chat")
    assert f"a run folder, not a model directory ({speedrun_quick}): did you mean {speedrun_quick / 'model'}?" in line
    # A `nanoseek train` run folder points at its final/.
    line = one_line(nanoseek("eval", "--model", speedrun_quick / "pretrain", "--task", "countdown"), "eval")
    assert line.endswith(f"did you mean {speedrun_quick / 'pretrain' / 'final'}?"), line


def test_corrupt_config_json(speedrun_quick, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(speedrun_quick / "model", model)
    (model / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": 64,,}')
    line = one_line(nanoseek("generate", "--model", model, "--prompt", "hi"), "generate")
    assert line.startswith("nanoseek generate: config.json is not valid JSON (Expecting property name enclosed in "
                           "double quotes at line 1 column 49)"), line
    assert f"({model / 'config.json'}): restore the file, or export the model again" in line
    # A corrupt tokenizer.json is named too (it used to end in a bare `Exception: expected ',' or '}'`).
    (model / "config.json").write_text((speedrun_quick / "model" / "config.json").read_text())
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    line = one_line(nanoseek("serve", "--model", model, "--port", "0"), "serve")
    assert "tokenizer.json is not a readable tokenizer" in line and str(model / "tokenizer.json") in line


def test_resume_with_another_model_preset(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--config", TINY, "--out", out, "--set", "data.n_docs=200", "--set", "train.steps=2",
            "--no-progress", "--threads", "1"]
    r = nanoseek(*base)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 2/2: loss " in r.stderr  # --no-progress keeps the loss, as log lines
    saved = (out / "config.toml").read_text()
    r = nanoseek(*base, "--resume", "--set", "model.preset=small", "--set", "train.steps=4")
    line = one_line(r, "train")
    assert "the checkpoint holds another model than the run config describes: hidden_size 64 (the config now: " \
           "256)" in line, line
    assert str(out / "checkpoints" / "step_0000002") in line and "its config.toml" in line
    assert (out / "config.toml").read_text() == saved  # the config it was trained with is still there


def test_port_in_use_is_reported_before_the_model_loads(speedrun_quick):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = nanoseek("serve", "--model", speedrun_quick / "model", "--port", port)
    line = one_line(r, "serve")
    assert line == (f"nanoseek serve: the port is already in use (127.0.0.1:{port}): stop the server that holds "
                    "it, or pass another --port")
    assert "loaded" not in r.stderr  # nothing was loaded before the check


# ----------------------------------------------------------------------------- devices (in process)
ALL_DEVICE_COMMANDS = sorted(k for k, (_, _, flags) in cli.COMMANDS.items() if "device" in flags)


def test_the_device_flag_is_on_every_command_that_runs_a_model():
    assert ALL_DEVICE_COMMANDS == ["chat", "distill", "eval", "generate", "grpo", "serve", "sft", "speedrun", "train"]


def device_argv(command: str, device: str, tmp: Path) -> list[str]:
    if command == "train":
        return ["train", "--config", str(TINY), "--out", str(tmp / "t"), "--device", device]
    if command == "speedrun":
        return ["speedrun", "--out", str(tmp / "s"), "--quick", "--device", device]
    return model_args(command, tmp / "nope", tmp) + ["--device", device]


@pytest.mark.parametrize("command", ALL_DEVICE_COMMANDS)
def test_an_unknown_device_is_one_line(command, tmp_path, capsys):
    assert cli.main(device_argv(command, "tpu9", tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == f"nanoseek {command}: --device tpu9: unknown device: use cpu, cuda, cuda:N or auto\n"
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", ALL_DEVICE_COMMANDS)
def test_cuda_without_cuda_is_one_line(command, tmp_path, capsys):
    assert cli.main(device_argv(command, "cuda", tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nanoseek {command}: --device cuda: CUDA is not available (") and err.count("\n") == 1
    assert err.endswith(": use --device cpu\n")


def test_train_and_speedrun_take_the_flags_as_config_overrides(tmp_path):
    """--device/--threads of train and speedrun become train.device / train.threads / speedrun.threads
    overrides (their configs hold them), checked before anything runs."""
    for argv, expect in ((["train", "--config", str(TINY), "--out", "x", "--device", "cpu", "--threads", "3"],
                          ["train.device=cpu", "train.threads=3"]),
                         (["speedrun", "--out", "x", "--device", "cpu", "--threads", "2"],
                          ["train.device=cpu", "speedrun.threads=2"])):
        args = cli.build_parser(argv).parse_args(argv)
        cli.apply_shared_flags(args)
        assert args.sets == expect
    from nanoseek.speedrun import QUICK, load_plan

    plan = load_plan(None, QUICK + ["train.device=cpu", "speedrun.threads=2"])
    assert plan.run.train.device == "cpu" and plan.speedrun.threads == 2


def test_other_commands_get_a_resolved_device_and_threads(tmp_path):
    argv = ["generate", "--model", "m", "--prompt", "p", "--threads", "1"]
    args = cli.build_parser(argv).parse_args(argv)
    threads = torch.get_num_threads()
    try:
        cli.apply_shared_flags(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert args.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the default: auto


# ----------------------------------------------------------------------------- tracebacks
def test_a_real_bug_keeps_its_traceback(monkeypatch):
    from nanoseek.infer import cli_generate

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_generate, "run", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["generate", "--model", "m", "--prompt", "p", "--device", "cpu"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_our_errors_too(where, tmp_path):
    argv = ["eval", "--model", str(tmp_path / "nope"), "--task", "countdown", "--device", "cpu"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(NanoseekError, match="no such model directory"):
        cli.main(argv)


def test_debug_in_a_subprocess_prints_the_traceback(tmp_path):
    r = nanoseek("--debug", "generate", "--model", tmp_path / "nope", "--prompt", "hi")
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError: no such model directory" in r.stderr


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--model", "m"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("nanoseek sft: the following arguments are required: --data, --out "
                                       "(see nanoseek sft --help)\n")


# ----------------------------------------------------------------------------- help, version, pipes
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    from nanoseek import __version__

    assert capsys.readouterr().out == f"nanoseek {__version__}\n"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_has_help_and_shows_its_default(command, capsys):
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and len(action.help) > 8, f"{command} {action.option_strings[0]} has no help"
        shown = sub.formatter_class(prog="x")._get_help_string(action)
        if action.default not in (None, False, [], "==SUPPRESS==") and "%(default)" not in action.help:
            assert "default" in shown, f"{command} {action.option_strings[0]}: default {action.default!r} not shown"
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--debug show the full traceback" in text
    if command == "serve":
        for flag in ("--port PORT TCP port to listen on (default: 8000)", "(rows of the running batch) (default: 16)",
                     "before answering 429 (default: 64)"):
            assert flag in text, text


def test_sft_flags_say_what_they_do(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in (("--steps", "optimizer steps"), ("--batch-size", "sequences per step"),
                        ("--lr", "peak learning rate"), ("--max-len", "longest example"),
                        ("--seed", "seed of the data order")):
        assert f"{flag} {flag.strip('-').upper().replace('-', '_')} {words}" in text, (flag, text)


def test_a_closed_pipe_is_not_a_traceback():
    """`nanoseek params --json | head`: the reader closes its end before the command writes."""
    import os

    proc = subprocess.Popen(PY + ["params", "--preset", "deepseek-v3", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **ENV})
    proc.stdout.close()  # long before the child has imported torch and printed
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141 and err == "", (proc.returncode, err)


def test_params_json_through_head(tmp_path):
    r = subprocess.run(f"{sys.executable} -m nanoseek.cli params --preset deepseek-v3 --json | head -n 2",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith('{\n  "model": "deepseek-v3"') and r.stderr == "", r.stderr


# ----------------------------------------------------------------------------- grpo's task, eval's output
def test_grpo_defaults_to_countdown(tmp_path):
    from nanoseek.rl.grpo_cli import build_config

    def config(*extra: str):
        argv = ["grpo", "--model", "m", "--out", "o", *extra]
        return build_config(cli.build_parser(argv).parse_args(argv))

    assert config().task == "countdown"
    toml = tmp_path / "g.toml"
    toml.write_text('[grpo]\ntask = "arithmetic"\n')
    assert config("--config", str(toml)).task == "arithmetic"  # a config still chooses
    assert config("--config", str(toml), "--task", "program").task == "program"
    with pytest.raises(NanoseekError, match=r"unknown reward\(s\) \['speed'\]"):
        config("--set", "reward_weights={speed=1.0}")


def test_eval_json_draws_no_progress_bar(speedrun_quick):
    r = nanoseek("eval", "--model", speedrun_quick / "model", "--task", "countdown", "--n", "3", "--k", "2",
                 "--max-new-tokens", "8", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 3
    assert "\r" not in r.stderr and "sample/s" not in r.stderr and "nanoseek: loaded" in r.stderr, r.stderr
    assert "float32) on cpu" in r.stderr  # the device reached the model
    # --dtype as for generate: the held-out accuracy of the model with int8 weights
    r = nanoseek("eval", "--model", speedrun_quick / "model", "--task", "countdown", "--n", "3", "--k", "2",
                 "--max-new-tokens", "8", "--json", "--threads", "1", "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 3 and "int8 weights (groups of 128)) on cpu" in r.stderr, r.stderr
