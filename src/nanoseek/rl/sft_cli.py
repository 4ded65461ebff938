"""`nanoseek sft --model DIR --data FILE|TASK --out DIR`: cold-start SFT, loss on assistant tokens only.

DATA is a built-in task name (its train split's worked solutions become the `<think>` traces) or a
JSONL chat file (see nanoseek.rl.sft for the accepted line formats). The result is a HF directory with
the tokenizer, plus OUT/sft_metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.rl.sft import SFTConfig

    d = SFTConfig()
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer (e.g. a pretraining run's final/)")
    parser.add_argument("--data", required=True, help="a built-in task name (arithmetic, countdown, program) or a JSONL file")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--n", type=int, default=2000, help="examples drawn from a built-in task (default 2000)")
    parser.add_argument("--difficulty", type=int, default=1, help="difficulty of a built-in task (default 1)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr", type=float, default=None, help="end of the cosine decay (default lr / 10)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--mtp-weight", type=float, default=d.mtp_weight)
    parser.add_argument("--max-len", type=int, default=d.max_len)
    parser.add_argument("--seed", type=int, default=d.seed)
    add_set_argument(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="any SFTConfig key (nanoseek.rl.sft), e.g. --set weight_decay=0.1 --set grad_clip=0.5 "
                             "(repeatable; applied after the flags)")


def sft_config(values: dict, sets: list[str]):
    """SFTConfig from command-line values, then `--set key=value` overrides; min_lr defaults to lr / 10."""
    from nanoseek.config_io import apply_sets
    from nanoseek.rl.sft import SFTConfig

    values = apply_sets({"sft": {k: v for k, v in values.items() if v is not None}}, sets, {"sft": SFTConfig},
                        default_section="sft")["sft"]
    values.setdefault("min_lr", values.get("lr", SFTConfig.lr) / 10)
    return SFTConfig(**values).validate()


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.sft import load_sft_data, sft_train
    from nanoseek.train.step import NonFiniteLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(f"nanoseek sft: {args.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        cfg = sft_config(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                              warmup_steps=args.warmup_steps, mtp_weight=args.mtp_weight, max_len=args.max_len,
                              seed=args.seed), args.sets)
        tok = load_tokenizer(args.model)
        pairs = load_sft_data(args.data, tok, n=args.n, difficulty=args.difficulty, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek sft: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = nanoseek.load(args.model, dtype=torch.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sft_metrics.jsonl").open("w") as f:
        try:
            sft_train(model, pairs, cfg, tok.pad_id, progress=not args.no_progress,
                      on_log=lambda r: (f.write(json.dumps(r) + "\n"), f.flush()))
        except NonFiniteLoss as e:
            print(f"nanoseek {e}; stopped, no model was written (try a lower --lr)", file=sys.stderr)  # e: "sft: ..."
            return 1
    nanoseek.save(model, out, tokenizer_dir=args.model)
    print(f"done: {out} ({len(pairs)} examples, {cfg.steps} steps)")
    return 0
