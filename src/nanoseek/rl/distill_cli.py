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
    parser.add_argument("--out", required=True, help="output directory for the student (its model itself, "
                        "traces.jsonl, distill.json)")
    parser.add_argument("--n", type=int, default=500, help="train problems to sample")
    parser.add_argument("--k", type=int, default=4, help="teacher samples per problem")
    parser.add_argument("--difficulty", type=int, default=1, help="difficulty of a built-in task")
    parser.add_argument("--temperature", type=float, default=0.7, help="the teacher's sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="the teacher's nucleus sampling")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per teacher sample at most")
    parser.add_argument("--steps", type=int, default=d.steps, help="student SFT steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="student SFT sequences per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="student SFT peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, the student's init and data order")
    add_set_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar: the loss as log lines")


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.hf import check_model_dir
    from nanoseek.rl.distill import build_student, rejection_sample, write_traces
    from nanoseek.rl.sft import sft_train
    from nanoseek.rl.sft_cli import log_line, sft_config
    from nanoseek.train.step import NonFiniteLoss

    check_model_dir(args.teacher)
    cfg = sft_config(dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed), args.sets)
    task = get_task(args.task)
    tok = load_tokenizer(args.teacher)
    student = build_student(args.student_config, tok.vocab_size, seed=args.seed)
    teacher = nanoseek.load(args.teacher, dtype=torch.float32, device=args.device)
    print(f"nanoseek distill: teacher {args.teacher} on {args.device}", file=sys.stderr)
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
    student.to(args.device)
    on_log = (lambda rec: print(log_line("distill", rec, cfg.steps), file=sys.stderr, flush=True)) \
        if args.no_progress else None
    try:
        recs = sft_train(student, pairs, cfg, tok.pad_id, progress=not args.no_progress, desc="distill", on_log=on_log)
    except NonFiniteLoss as e:
        e.hint = "stopped, no student was written (try a lower --lr)"
        raise
    nanoseek.save(student, out, tokenizer_dir=args.teacher)
    (out / "distill.json").write_text(json.dumps({**asdict(stats), "keep_rate": stats.keep_rate,
                                                  "final_loss": recs[-1]["loss"]}, indent=2) + "\n")
    print(f"done: {out}")
    return 0
