"""`nanoseek eval --model DIR --task NAME --n N [--k K] [--json]`: pass@1 and cons@k on the held-out split.

pass@1 is the mean correctness over k samples per problem, cons@k the accuracy of their majority answer
(nanoseek.rl.evaluate), sampled at temperature 0.6 and top-p 0.95 as in DeepSeek-R1's evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer")
    parser.add_argument("--task", required=True, help="built-in task name or a task JSONL file")
    parser.add_argument("--n", type=int, default=200, help="held-out problems (default 200)")
    parser.add_argument("--k", type=int, default=4, help="samples per problem (default 4)")
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--samples", default=None, help="also write every sample to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(f"nanoseek eval: {args.model} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    try:
        task = get_task(args.task)
        tok = load_tokenizer(args.model)
        model = nanoseek.load(args.model, dtype=torch.float32)
        res = evaluate(model, tok, task, n=args.n, k=args.k, difficulty=args.difficulty, temperature=args.temperature,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, split=args.split,
                       progress=not args.json)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"nanoseek eval: {e}", file=sys.stderr)
        return 2
    if args.samples:
        Path(args.samples).write_text(json.dumps(res.samples, indent=1) + "\n")
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"{res.task} ({args.split} split, difficulty {args.difficulty}): {res.n} problems x {res.k} samples "
              f"at T={res.temperature}, top-p {res.top_p}")
        print(f"  pass@1  {res.pass_at_1:.1%}")
        print(f"  cons@{res.k}  {res.cons_at_k:.1%}")
        print(f"  format  {res.format_rate:.1%}   mean length {res.mean_length:.1f} tokens   "
              f"truncated {res.truncated:.1%}")
    return 0
