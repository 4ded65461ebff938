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
    parser.add_argument("--model", required=True,
                        help="HF model directory with its tokenizer (e.g. a pretraining run's final/)")
    parser.add_argument("--data", required=True,
                        help="a built-in task name (arithmetic, countdown, program) or a JSONL chat file")
    parser.add_argument("--out", required=True, help="output model directory (the SFT model itself, plus "
                        "sft_metrics.jsonl)")
    parser.add_argument("--n", type=int, default=2000, help="examples drawn from a built-in task")
    parser.add_argument("--difficulty", type=int, default=1, help="difficulty of a built-in task")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (after the warm-up)")
    parser.add_argument("--min-lr", type=float, default=None, help="end of the cosine decay (default: lr / 10)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    parser.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="weight of the MTP loss")
    parser.add_argument("--max-len", type=int, default=d.max_len,
                        help="longest example in tokens (longer ones are dropped, with a count)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and sampling")
    add_set_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar: the loss as log lines")


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


def log_line(desc: str, rec: dict, steps: int) -> str:
    """One training record as the log line `--no-progress` prints in place of the progress bar."""
    return (f"{desc} step {rec['step']}/{steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
            f"grad norm {rec['grad_norm']:.3f}, {rec.get('tokens_per_s', 0):.0f} tok/s")


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.hf import check_model_dir
    from nanoseek.rl.sft import load_sft_data, sft_train
    from nanoseek.train.step import NonFiniteLoss

    check_model_dir(args.model)
    cfg = sft_config(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                          warmup_steps=args.warmup_steps, mtp_weight=args.mtp_weight, max_len=args.max_len,
                          seed=args.seed), args.sets)
    tok = load_tokenizer(args.model)
    pairs = load_sft_data(args.data, tok, n=args.n, difficulty=args.difficulty, seed=args.seed)
    torch.manual_seed(args.seed)
    model = nanoseek.load(args.model, dtype=torch.float32, device=args.device)
    print(f"nanoseek sft: {len(pairs)} examples, {cfg.steps} steps on {args.device}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def on_log(rec: dict) -> None:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        if args.no_progress:
            print(log_line("sft", rec, cfg.steps), file=sys.stderr, flush=True)

    with (out / "sft_metrics.jsonl").open("w") as f:
        try:
            sft_train(model, pairs, cfg, tok.pad_id, progress=not args.no_progress, on_log=on_log)
        except NonFiniteLoss as e:
            e.hint = "stopped, no model was written (try a lower --lr)"
            raise
    nanoseek.save(model, out, tokenizer_dir=args.model)
    print(f"done: {out} ({len(pairs)} examples, {cfg.steps} steps)")
    return 0
