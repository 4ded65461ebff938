"""`nanoseek grpo --model DIR --task NAME --out DIR`: GRPO with rule-based rewards (nanoseek.rl.trainer).

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.config_io import field_types
    from nanoseek.rl.trainer import GRPOConfig

    hints = field_types(GRPOConfig)
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer (usually an SFT model)")
    parser.add_argument("--task", default=None, help="built-in task name or a task JSONL file (default arithmetic)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics, plots, final/")
    parser.add_argument("--config", default=None, help="TOML file whose [grpo] section sets GRPOConfig keys")
    for flag, name in FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=name, type=hints[name], default=None,
                            help=f"GRPOConfig.{name} (default {getattr(GRPOConfig(), name)})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="any GRPOConfig key, e.g. --set reward_weights={accuracy=1.0,format=0.1}")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")


def build_config(args: argparse.Namespace):
    """GRPOConfig from defaults < [grpo] of --config < flags < --set (nanoseek.config_io checks every key)."""
    from nanoseek.config_io import apply_sets, read_toml, typed_values
    from nanoseek.rl.trainer import GRPOConfig

    values: dict = {}
    if args.config:
        values.update(typed_values(GRPOConfig, read_toml(args.config).get("grpo", {}), "grpo", args.config))
    for name in FLAGS.values():
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.task is not None:
        values["task"] = args.task
    values = apply_sets({"grpo": values}, args.sets, {"grpo": GRPOConfig}, default_section="grpo")["grpo"]
    return dataclasses.replace(GRPOConfig(), **values).validate()


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.trainer import GRPOTrainer, plot_grpo
    from nanoseek.train.step import NonFiniteLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(f"nanoseek grpo: {args.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
        get_task(cfg.task)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"nanoseek grpo: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    from nanoseek.train.checkpoint import list_checkpoints

    if list_checkpoints(out / "checkpoints") and not args.resume:
        print(f"nanoseek grpo: {out} already holds checkpoints: pass --resume or choose another --out", file=sys.stderr)
        return 2
    tok = load_tokenizer(args.model)
    model = nanoseek.load(args.model, dtype=torch.float32)
    trainer = GRPOTrainer(model, tok, cfg, out_dir=out, tokenizer_dir=args.model, progress=not args.no_progress)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.state.step}", file=sys.stderr)
    try:
        trainer.train()
    except KeyboardInterrupt:
        print("nanoseek grpo: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f"nanoseek {e}; stopped, no checkpoint was written after it", file=sys.stderr)  # e: "grpo: ..."
        return 1
    final = out / "final"
    nanoseek.save(model, final, tokenizer_dir=args.model)
    plot_grpo(trainer.state.history, out / "reward.png")
    last = trainer.state.history[-1] if trainer.state.history else {}
    print(f"done: {final} (last step: reward {last.get('reward', 0):.3f}, accuracy {last.get('accuracy', 0):.3f})")
    return 0
