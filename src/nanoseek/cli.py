"""The `nanoseek` command: one table of subcommands, each an ordinary function in its own module.

Each entry names a module that defines `add_arguments(parser)` and `run(args) -> int | None`. Modules are
imported only when their subcommand runs, so `nanoseek params` never imports FastAPI or transformers.

What every command shares lives here, once:
* `--device` and `--threads` for the commands that run a model (the table's third column). The device is
  checked before anything loads (an unknown name, or `cuda` without CUDA, is a one-line error) and reaches
  the command as `args.device`, a torch.device; `train` and `speedrun` take theirs from the run config
  (`train.device`, `train.threads` / `speedrun.threads`) unless the flag is given, which then becomes a
  `--set` override.
* One error style. The project's own errors (nanoseek.errors.NanoseekError: a bad path, a bad config, a
  checkpoint of another model, a corrupt file, a port in use, ...) print as one line,
  `nanoseek <command>: <what> (<path>): <what to do>`, with exit status 2 (1 for a run that diverged).
  Argument errors are one line too. Anything else is a bug and keeps its traceback; `--debug` (before or
  after the command, or NANOSEEK_DEBUG=1) shows the traceback of every error.
* `--version`, defaults shown in every `--help`, and a quiet exit when stdout is a closed pipe
  (`nanoseek params --json | head`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help, shared flags)
MODEL = ("device", "threads")
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "params": ("nanoseek.accounting", "parameter counts, KV-cache bytes and FLOPs per token of a config", ()),
    "cost": ("nanoseek.cost", "GPU-hours and dollars for a training run, or the MFU implied by a known cost", ()),
    "plan": ("nanoseek.plan.cli", "per-GPU memory and step time of a PP x EP x ZeRO layout; search the ones that fit",
             ()),
    "train": ("nanoseek.train.cli", "pretrain a model (single process or under torchrun)", MODEL),
    "sft": ("nanoseek.rl.sft_cli", "cold-start supervised fine-tuning on chat data or a built-in task", MODEL),
    "grpo": ("nanoseek.rl.grpo_cli", "GRPO reinforcement learning with rule-based rewards", MODEL),
    "distill": ("nanoseek.rl.distill_cli", "rejection-sample a teacher and SFT a student on verified traces", MODEL),
    "eval": ("nanoseek.rl.eval_cli", "pass@1 and cons@k on a task's held-out split", MODEL),
    "generate": ("nanoseek.infer.cli_generate", "generate text from a prompt", MODEL),
    "chat": ("nanoseek.infer.cli_chat", "chat with a model in the terminal", MODEL),
    "serve": ("nanoseek.serve.cli", "OpenAI-compatible API server and web chat", MODEL),
    "quantize": ("nanoseek.infer.quant_io", "write a checkpoint with int8, int4 or bf16 weights for fast CPU decoding",
                 ()),
    "convert": ("nanoseek.convert", "convert a checkpoint: V3 -> V3.2 (adds freshly initialised DSA indexers)", ()),
    "build-kernels": ("nanoseek.infer.fast.build_cli", "build the C++ CPU decode kernels now (not on first use); say where",
                      ()),
    "speedrun": ("nanoseek.speedrun", "the end-to-end pipeline on the built-in data: tokenizer to RL to export", MODEL),
}
# Commands whose device and thread count come from their run config unless the flag is given.
CONFIG_KEYS = {"train": {"device": "train.device", "threads": "train.threads"},
               "speedrun": {"device": "train.device", "threads": "speedrun.threads"}}


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("nanoseek")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        from nanoseek import __version__

        return __version__


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `nanoseek generate: the following arguments are required: --model`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it is None/False (nothing to show) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(default, list) and not default):
            return text
        return f"{text} (default: %(default)s)"


def add_shared_flags(p: argparse.ArgumentParser, name: str, flags: tuple[str, ...]) -> None:
    keys = CONFIG_KEYS.get(name, {})
    if "device" in flags:
        default = f"the config's {keys['device']}" if "device" in keys else "auto"
        p.add_argument("--device", default=None, metavar="DEVICE",
                       help=f"where the model runs: cpu, cuda, cuda:N or auto = cuda when available, else cpu "
                            f"(default: {default})")
    if "threads" in flags:
        default = f"the config's {keys['threads']}" if "threads" in keys else "torch's, one per core"
        p.add_argument("--threads", type=int, default=None, metavar="N", help=f"torch CPU threads (default: {default})")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of any error")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    # Only the module of the subcommand being run is imported (keeps `--help` and startup fast).
    first = next((a for a in argv if not a.startswith("-")), None)  # global flags may come before it
    requested = {first} & COMMANDS.keys()
    parser = Parser(prog="nanoseek", description="DeepSeek-V3 / R1 at any scale.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"nanoseek {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_text, flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name in requested:
            importlib.import_module(module).add_arguments(p)
            add_shared_flags(p, name, flags)
    return parser


def apply_shared_flags(args: argparse.Namespace) -> None:
    """Check --device and apply --threads before the command runs (see the module docstring)."""
    keys = CONFIG_KEYS.get(args.command, {})
    device = getattr(args, "device", None)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        from nanoseek.config import ConfigError

        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if "device" in COMMANDS[args.command][2]:
        from nanoseek.device import resolve_device

        if device is not None or "device" not in keys:
            args.device = resolve_device(device or "auto", "--device")
        if device is not None and "device" in keys:
            args.sets.append(f"{keys['device']}={device}")
    if threads is not None:
        if "threads" in keys:
            args.sets.append(f"{keys['threads']}={threads}")
        elif threads:
            import torch

            torch.set_num_threads(threads)


def _quiet_broken_pipe() -> int:
    """stdout was closed by the reader (`| head`): send the rest to /dev/null so the interpreter's final
    flush does not raise again, and exit as a process killed by SIGPIPE would (128 + 13)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    debug = bool(getattr(args, "debug", False)) or os.environ.get("NANOSEEK_DEBUG", "") not in ("", "0")
    from nanoseek.errors import NanoseekError

    try:
        apply_shared_flags(args)
        rc = importlib.import_module(args._module).run(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at interpreter exit
    except NanoseekError as e:
        if debug:
            raise
        message = str(e).removeprefix(f"{args.command}: ")  # messages made for the library name their stage
        print(f"nanoseek {args.command}: {message}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
