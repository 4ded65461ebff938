"""`nanoseek grpo --model DIR --task NAME --out DIR`: GRPO with rule-based rewards (nanoseek.rl.trainer).
The task defaults to Countdown, the one GRPO lifts at this scale (the speedrun's task).

Settings come from the defaults of GRPOConfig, then an optional TOML file's [grpo] section (`--config`),
then flags (`--G 8 --beta 0.001 --clip-eps 0.2 --lr 1e-4 --temperature 1 --max-new-tokens 64
--prompts-per-step 16 --steps 50 ...`), then `--set key=value` for any GRPOConfig key. OUT holds the
checkpoints (exact resume with --resume), metrics.jsonl, reward.png and the final model in OUT/final.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# flag name -> GRPOConfig field
FLAGS = {"G": "G", "beta": "beta", "clip_eps": "clip_eps", "lr": "lr", "temperature": "temperature",
         "top_p": "top_p", "max_new_tokens": "max_new_tokens", "prompts_per_step": "prompts_per_step",
         "steps": "steps", "difficulty": "difficulty", "mu": "mu", "minibatches": "minibatches",
         "aggregation": "aggregation", "seed": "seed", "save_every": "save_every"}
# Countdown: the task GRPO lifts at this scale (the speedrun's; nanoseek.speedrun says why not arithmetic).
DEFAULT_TASK = "countdown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.config_io import field_types
    from nanoseek.rl.trainer import GRPOConfig

    hints = field_types(GRPOConfig)
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer (usually an SFT model)")
    parser.add_argument("--task", default=None, help=f"built-in task name or a task JSONL file (default: "
                        f"{DEFAULT_TASK}, the task GRPO improves in the speedrun)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics, plots, final/")
    parser.add_argument("--config", default=None, help="TOML file whose [grpo] section sets GRPOConfig keys")
    for flag, name in FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=name, type=hints[name], default=None,
                            help=f"GRPOConfig.{name} (default: {getattr(GRPOConfig(), name)})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="any GRPOConfig key, e.g. --set reward_weights={accuracy=1.0,format=0.1}")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar: each logged step as a line")


def build_config(args: argparse.Namespace):
    """GRPOConfig from defaults < [grpo] of --config < flags < --set (nanoseek.config_io checks every key)."""
    from nanoseek.config import ConfigError
    from nanoseek.config_io import apply_sets, read_toml, typed_values
    from nanoseek.rl.rewards import REWARDS
    from nanoseek.rl.trainer import GRPOConfig

    values: dict = {"task": DEFAULT_TASK}
    if args.config:
        values.update(typed_values(GRPOConfig, read_toml(args.config).get("grpo", {}), "grpo", args.config))
    for name in FLAGS.values():
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.task is not None:
        values["task"] = args.task
    values = apply_sets({"grpo": values}, args.sets, {"grpo": GRPOConfig}, default_section="grpo")["grpo"]
    try:
        cfg = dataclasses.replace(GRPOConfig(), **values).validate()
    except ValueError as e:  # GRPOConfig.validate names the key
        raise ConfigError(str(e)) from None
    unknown = sorted(set(cfg.reward_weights or {}) - set(REWARDS))
    if unknown:
        raise ConfigError(f"unknown reward(s) {unknown} in reward_weights", hint=f"registered: {sorted(REWARDS)}")
    return cfg


def log_line(rec: dict, steps: int) -> str:
    """One logged GRPO step as the line `--no-progress` prints in place of the progress bar."""
    return (f"grpo step {rec['step']}/{steps}: reward {rec['reward']:.3f}, accuracy {rec['accuracy']:.3f}, "
            f"format {rec['format']:.3f}, length {rec['response_length']:.1f}, zero-variance groups "
            f"{rec['zero_var_frac']:.2f}, kl {rec.get('kl', 0.0):.4f}")


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.hf import check_model_dir
    from nanoseek.rl.trainer import GRPOTrainer, plot_grpo
    from nanoseek.train.checkpoint import list_checkpoints
    from nanoseek.train.step import NonFiniteLoss, TrainingError

    check_model_dir(args.model)
    cfg = build_config(args)
    get_task(cfg.task)
    out = Path(args.out)
    if list_checkpoints(out / "checkpoints") and not args.resume:
        raise TrainingError("the folder already holds checkpoints", out, "pass --resume to continue, or choose "
                            "another --out")
    tok = load_tokenizer(args.model)
    model = nanoseek.load(args.model, dtype=torch.float32, device=args.device)
    print(f"nanoseek grpo: {cfg.task}, {cfg.steps} steps x {cfg.prompts_per_step} prompts x G={cfg.G} on "
          f"{args.device}", file=sys.stderr)
    on_log = (lambda rec: print(log_line(rec, cfg.steps), file=sys.stderr, flush=True)) if args.no_progress else None
    trainer = GRPOTrainer(model, tok, cfg, out_dir=out, tokenizer_dir=args.model, progress=not args.no_progress,
                          on_log=on_log)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.state.step}", file=sys.stderr)
    try:
        trainer.train()
    except KeyboardInterrupt:
        print("nanoseek grpo: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        e.hint = "stopped, no checkpoint was written after it"
        raise
    final = out / "final"
    nanoseek.save(model, final, tokenizer_dir=args.model)
    plot_grpo(trainer.state.history, out / "reward.png")
    last = trainer.state.history[-1] if trainer.state.history else {}
    print(f"done: {final} (last step: reward {last.get('reward', 0):.3f}, accuracy {last.get('accuracy', 0):.3f})")
    return 0
