"""`nanoseek eval --model DIR --task NAME --n N [--k K] [--json]`: pass@1 and cons@k on the held-out split.

pass@1 is the mean correctness over k samples per problem, cons@k the accuracy of their majority answer
(nanoseek.rl.evaluate), sampled at temperature 0.6 and top-p 0.95 as in DeepSeek-R1's evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.infer.cli_generate import add_dtype_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory with its tokenizer")
    parser.add_argument("--task", required=True, help="built-in task name (arithmetic, countdown, program) or a "
                        "task JSONL file")
    parser.add_argument("--n", type=int, default=200, help="held-out problems")
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--difficulty", type=int, default=1, help="difficulty of a built-in task")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1's evaluation)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (R1's evaluation)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems' samples")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="which split to draw from")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object (and no "
                        "progress bar)")
    parser.add_argument("--samples", default=None, help="also write every sample to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dtype_argument(parser)  # e.g. --dtype int8: the held-out accuracy of the quantized model


def run(args: argparse.Namespace) -> int:
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.hf import check_model_dir
    from nanoseek.infer.generate import load_model
    from nanoseek.rl.evaluate import evaluate

    check_model_dir(args.model)
    task = get_task(args.task)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device)  # says on stderr what it loaded, in which dtype
    res = evaluate(model, tok, task, n=args.n, k=args.k, difficulty=args.difficulty, temperature=args.temperature,
                   top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, split=args.split,
                   progress=not (args.json or args.no_progress))
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
