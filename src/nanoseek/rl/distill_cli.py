"""`nanoseek distill --teacher DIR --task NAME --student-config PRESET|FILE|DIR --out DIR`: rejection-sample
the teacher on the task's train split, keep only verified-correct traces, and SFT the student on them
(nanoseek.rl.distill). OUT gets the student (HF directory with the teacher's tokenizer), traces.jsonl and
distill.json (keep rate and counts).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.rl.sft import SFTConfig
    from nanoseek.rl.sft_cli import add_set_argument

    d = SFTConfig()
    parser.add_argument("--teacher", required=True, help="teacher model directory (with its tokenizer)")
    parser.add_argument("--task", required=True, help="built-in task name or a task JSONL file")
    parser.add_argument("--student-config", required=True,
                        help="a preset name (tiny, small, ...), a model config JSON / run config TOML, or a model directory")
    parser.add_argument("--out", required=True, help="output directory for the student")
    parser.add_argument("--n", type=int, default=500, help="train problems to sample (default 500)")
    parser.add_argument("--k", type=int, default=4, help="teacher samples per problem (default 4)")
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=d.steps, help="student SFT steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=0)
    add_set_argument(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.config import ConfigError
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.distill import build_student, rejection_sample, write_traces
    from nanoseek.rl.sft import sft_train
    from nanoseek.rl.sft_cli import sft_config
    from nanoseek.train.step import NonFiniteLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.teacher) / "config.json").is_file():
        print(f"nanoseek distill: {args.teacher} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        cfg = sft_config(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed), args.sets)
        task = get_task(args.task)
        tok = load_tokenizer(args.teacher)
        student = build_student(args.student_config, tok.vocab_size, seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError, ConfigError) as e:
        print(f"nanoseek distill: {e}", file=sys.stderr)
        return 2
    teacher = nanoseek.load(args.teacher, dtype=torch.float32)
    pairs, rows, stats = rejection_sample(teacher, tok, task, args.n, k=args.k, difficulty=args.difficulty,
                                          temperature=args.temperature, top_p=args.top_p,
                                          max_new_tokens=args.max_new_tokens, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_traces(rows, out / "traces.jsonl")
    print(f"kept {stats.kept} of {stats.sampled} samples ({stats.keep_rate:.1%}); {stats.problems_covered} of "
          f"{stats.problems} problems covered", file=sys.stderr)
    if not pairs:
        print("nanoseek distill: the teacher produced no verified-correct trace; nothing to train on", file=sys.stderr)
        return 1
    del teacher
    try:
        recs = sft_train(student, pairs, cfg, tok.pad_id, progress=not args.no_progress, desc="distill")
    except NonFiniteLoss as e:
        print(f"nanoseek {e}; stopped, no student was written (try a lower --lr)", file=sys.stderr)  # "distill: ..."
        return 1
    nanoseek.save(student, out, tokenizer_dir=args.teacher)
    (out / "distill.json").write_text(json.dumps({**asdict(stats), "keep_rate": stats.keep_rate,
                                                  "final_loss": recs[-1]["loss"]}, indent=2) + "\n")
    print(f"done: {out}")
    return 0
