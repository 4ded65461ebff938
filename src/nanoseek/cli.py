"""The `nanoseek` command: one table of subcommands, each an ordinary function in its own module.

Each entry names a module that defines `add_arguments(parser)` and `run(args) -> int | None`. Modules are
imported only when their subcommand runs, so `nanoseek params` never imports FastAPI or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("nanoseek.accounting", "parameter counts, KV-cache bytes and FLOPs per token of a config"),
    "cost": ("nanoseek.cost", "GPU-hours and dollars for a training run, or the MFU implied by a known cost"),
    "plan": ("nanoseek.plan.cli", "per-GPU memory and step time of a PP x EP x ZeRO layout; search the ones that fit"),
    "train": ("nanoseek.train.cli", "pretrain a model (single process or under torchrun)"),
    "sft": ("nanoseek.rl.sft_cli", "cold-start supervised fine-tuning on chat data or a built-in task"),
    "grpo": ("nanoseek.rl.grpo_cli", "GRPO reinforcement learning with rule-based rewards"),
    "distill": ("nanoseek.rl.distill_cli", "rejection-sample a teacher and SFT a student on verified traces"),
    "eval": ("nanoseek.rl.eval_cli", "pass@1 and cons@k on a task's held-out split"),
    "generate": ("nanoseek.infer.cli_generate", "generate text from a prompt"),
    "chat": ("nanoseek.infer.cli_chat", "chat with a model in the terminal"),
    "serve": ("nanoseek.serve.cli", "OpenAI-compatible API server and web chat"),
    "quantize": ("nanoseek.infer.quant_io", "write a checkpoint with int8 or bf16 weights for fast CPU decoding"),
    "convert": ("nanoseek.convert", "convert a checkpoint: V3 -> V3.2 (adds freshly initialised DSA indexers)"),
    "build-kernels": ("nanoseek.infer.fast.build", "build the C++ CPU decode kernels now (not on first use); say where"),
    "speedrun": ("nanoseek.speedrun", "the end-to-end pipeline on the built-in data: tokenizer to RL to export"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    # Only the module of the subcommand being run is imported (keeps `--help` and startup fast).
    requested = {a for a in argv[:1] if a in COMMANDS}
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 at any scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name in requested:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    rc = importlib.import_module(args._module).run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
