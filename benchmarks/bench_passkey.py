"""Passkey accuracy of a small model before and after V3 -> V3.2 conversion (issue 11, item 6).

End to end through the real CLI (`nanoseek.cli.main`, in this process, so one interpreter and one torch
thread for everything):

  1. dense V3 model   `nanoseek train` briefly on the built-in corpus (the tokenizer and a starting model),
                      then `nanoseek sft` on passkey problems (a JSONL file of `make_passkey` examples, the
                      loss on the answer only), filler lengths drawn log-uniformly from `train_words`;
  2. evaluation       `nanoseek eval --task FILE.jsonl --k 1 --temperature 0`: greedy decoding, exact key
                      match (the passkey checker: the number after `</think>`), on held-out problems at
                      two filler lengths, the key at evenly spaced depths;
  3. conversion       `nanoseek convert --to v3.2 --index-topk K` with K well below the evaluation
                      lengths, so every query late in the prompt attends to K of its ~150-250 tokens and
                      the indexer's choice decides whether the key is seen; evaluated as converted (fresh
                      indexers), after the dense warm-up (`nanoseek train --set dsa.stage=warmup`) and
                      after sparse training (`--set dsa.stage=sparse`), both on fresh passkey transcripts.

Printed: the side-by-side table (dense V3 / converted / after warm-up / after sparse training) with, per
length, the exact-match accuracy, the share of key digits right and of well-formed answers, and the
indexer KL (`indexer_kl` of metrics.jsonl) at the start and end of each stage. The JSON holds those plus
accuracy per depth third, the settings, lengths (words and tokens), top-k, number of problems, seconds
per phase and the commands that ran; `--table FILE` prints the table of a result file.

Run: `.venv/bin/python -m benchmarks.bench_passkey --threads 1` (about 20 minutes on a 2-core CPU);
`--quick` is the same pipeline on a few steps and short prompts (a pipeline check, not a measurement).
Results: benchmarks/results/passkey.json (`--json PATH` writes elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("dense", "converted", "warmup", "sparse")
LABELS = {"dense": "dense V3", "converted": "V3.2 as converted", "warmup": "after dense warm-up",
          "sparse": "after sparse training"}

# The model is `tiny` (3 layers, d=64, MoE + MTP) with room for 1K positions. FULL fits the whole benchmark
# in ~20 minutes of one CPU thread (almost all of it SFT); QUICK checks the pipeline in seconds.
FULL = dict(pretrain_steps=30, pretrain_docs=2000, sft_steps=1200, sft_batch=16, sft_lr=3e-3, train_words=(8, 128),
            n_train=8000, eval_words=(48, 112), n_eval=30, max_new_tokens=40, index_topk=16, index_n_heads=4,
            index_head_dim=32, stage_seq_len=256, stage_batch=8, warmup_steps=60, warmup_lr=3e-3, sparse_steps=60,
            sparse_lr=1e-3, max_position_embeddings=1024)
QUICK = dict(pretrain_steps=2, pretrain_docs=200, sft_steps=6, sft_batch=4, sft_lr=3e-3, train_words=(8, 48),
             n_train=64, eval_words=(24, 48), n_eval=2, max_new_tokens=12, index_topk=8, index_n_heads=2,
             index_head_dim=16, stage_seq_len=128, stage_batch=2, warmup_steps=3, warmup_lr=3e-3, sparse_steps=3,
             sparse_lr=1e-3, max_position_embeddings=256)


def write_problems(path: Path, n: int, words: tuple[int, int] | int, seed: int, fmt: str) -> dict[str, float]:
    """n passkey problems as JSONL; words a (min, max) range drawn log-uniformly, or one length with the key
    at evenly spaced depths. fmt "task" writes {prompt, answer, solution} rows (SFT data and eval tasks),
    "text" writes {"text": transcript} rows (a `nanoseek train` corpus). Returns {prompt: depth}."""
    from nanoseek.data.chat import transcript_text
    from nanoseek.data.tasks.passkey import make_passkey

    rng = random.Random(f"passkey-bench:{seed}")
    depths = {}
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if isinstance(words, tuple):
                w = round(math.exp(rng.uniform(math.log(words[0]), math.log(words[1]))))
                ex = make_passkey(rng, w)
            else:
                ex = make_passkey(rng, words, depth=(i + 0.5) / n)
            depths[ex.prompt] = ex.meta["depth"]
            if fmt == "text":
                row = {"text": transcript_text(ex.prompt, ex.solution, ex.answer)}
            else:
                row = {"prompt": ex.prompt, "answer": ex.answer, "solution": ex.solution, "checker": "numeric",
                       "split": "test" if isinstance(words, int) else "train"}
            f.write(json.dumps(row) + "\n")
    return depths


def cli(argv: list[str], log: list, quiet: bool = True) -> tuple[float, str]:
    """Run one `nanoseek` command in this process; (seconds, its stdout). A failure raises with its stderr."""
    from nanoseek.cli import main

    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err if quiet else sys.stderr):
        rc = main(argv)
    seconds = time.perf_counter() - t
    log.append({"argv": ["nanoseek", *argv], "seconds": round(seconds, 1)})
    if rc:
        raise RuntimeError(f"nanoseek {' '.join(argv)} failed ({rc}):\n{err.getvalue()[-3000:]}")
    return seconds, out.getvalue()


def kl_summary(run_dir: Path) -> dict:
    """indexer_kl of a stage's metrics.jsonl: the first logged step and the mean of the last few."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kls = [r["indexer_kl"] for r in recs if "indexer_kl" in r]
    tail = kls[-max(1, len(kls) // 10):]
    losses = [r["loss"] for r in recs[-len(tail):]]
    return {"first": _sig(kls[0]), "last": _sig(sum(tail) / len(tail)), "steps": recs[-1]["step"],
            "loss_last": _sig(sum(losses) / len(losses))}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def evaluate(model: Path, tasks: dict[int, Path], depths: dict[str, float], n: int, max_new_tokens: int,
             threads: int, work: Path, log: list, name: str) -> dict:
    """Greedy exact-match accuracy per filler length (and per depth third) with `nanoseek eval`."""
    res = {"accuracy": {}, "by_depth": {}, "digit_accuracy": {}, "format_rate": {}, "seconds": 0.0}
    for words, task in tasks.items():
        samples = work / f"samples_{name}_{words}.json"
        seconds, out = cli(["eval", "--model", str(model), "--task", str(task), "--n", str(n), "--k", "1",
                            "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--samples", str(samples), "--json",
                            "--threads", str(threads)], log)
        summary = json.loads(out.strip().splitlines()[-1])
        res["accuracy"][words] = summary["pass_at_1"]
        res["format_rate"][words] = summary["format_rate"]
        thirds = [[0, 0], [0, 0], [0, 0]]
        digits = [0, 0]
        for s in json.loads(samples.read_text()):
            answer = "".join(ch for ch in s["answers"][0] if ch.isdigit())
            digits[0] += sum(a == b for a, b in zip(answer, s["reference"]))
            digits[1] += len(s["reference"])
            third = min(2, int(depths[s["prompt"]] * 3))
            thirds[third][0] += bool(s["correct"][0])
            thirds[third][1] += 1
        res["digit_accuracy"][words] = round(digits[0] / digits[1], 4)
        res["by_depth"][words] = [round(c / t, 4) if t else None for c, t in thirds]
        res["seconds"] += seconds
    res["seconds"] = round(res["seconds"], 1)
    return res


def prompt_tokens(model: Path, tasks: dict[int, Path]) -> dict[int, float]:
    from nanoseek.data.chat import render_prompt
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    lengths = {}
    for words, task in tasks.items():
        rows = [json.loads(line) for line in task.read_text().splitlines() if line.strip()]
        lengths[words] = round(sum(len(render_prompt(r["prompt"], tok)) for r in rows) / len(rows), 1)
    return lengths


def run(s: dict, work: Path, threads: int, quick: bool) -> dict:
    torch.set_num_threads(threads)
    log: list = []
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    config = str(ROOT / "configs" / "tiny.toml")
    common = ["--threads", str(threads), "--no-progress"]

    # 1. the dense V3 model: a brief pretraining on the built-in corpus (the tokenizer, the language), then
    # SFT on passkey problems (loss on the answer only)
    seconds["pretrain"], _ = cli(["train", "--config", config, "--out", str(work / "pretrain"), *common,
                                  "--set", f"train.steps={s['pretrain_steps']}", "--set", "train.save_every=0",
                                  "--set", "train.seq_len=128", "--set", f"data.n_docs={s['pretrain_docs']}",
                                  "--set", f"model.max_position_embeddings={s['max_position_embeddings']}"], log)
    write_problems(work / "sft.jsonl", s["n_train"], tuple(s["train_words"]), seed=1, fmt="task")
    dense = work / "dense"
    seconds["sft"], _ = cli(["sft", "--model", str(work / "pretrain" / "final"), "--data", str(work / "sft.jsonl"),
                             "--out", str(dense), "--steps", str(s["sft_steps"]), "--batch-size", str(s["sft_batch"]),
                             "--lr", str(s["sft_lr"]), "--warmup-steps", str(min(20, s["sft_steps"] // 4)),
                             "--max-len", str(s["max_position_embeddings"]), *common,
                             "--set", f"log_every={max(1, s['sft_steps'] // 30)}"], log)
    sft_recs = [json.loads(line) for line in (dense / "sft_metrics.jsonl").read_text().splitlines()]

    depths: dict[str, float] = {}
    tasks = {}
    for words in s["eval_words"]:
        tasks[words] = work / f"eval_{words}.jsonl"
        depths.update(write_problems(tasks[words], s["n_eval"], words, seed=1000 + words, fmt="task"))
    results = {"dense": evaluate(dense, tasks, depths, s["n_eval"], s["max_new_tokens"], threads, work, log, "dense")}

    # 2. V3 -> V3.2 with fresh indexers
    v32 = work / "v32"
    seconds["convert"], _ = cli(["convert", "--model", str(dense), "--to", "v3.2", "--out", str(v32),
                                 "--index-topk", str(s["index_topk"]), "--index-n-heads", str(s["index_n_heads"]),
                                 "--index-head-dim", str(s["index_head_dim"])], log)
    results["converted"] = evaluate(v32, tasks, depths, s["n_eval"], s["max_new_tokens"], threads, work, log, "converted")

    # 3. the two V3.2 training stages on passkey transcripts
    write_problems(work / "stage.jsonl", s["n_train"], tuple(s["train_words"]), seed=2, fmt="text")
    kl = {}
    start = v32
    for stage, steps, lr in (("warmup", s["warmup_steps"], s["warmup_lr"]), ("sparse", s["sparse_steps"], s["sparse_lr"])):
        out = work / stage
        seconds[stage], _ = cli(["train", "--config", config, "--out", str(out), *common,
                                 "--set", f"train.init_from={start}", "--set", f"dsa.stage={stage}",
                                 "--set", f"data.source={work / 'stage.jsonl'}",
                                 "--set", f"train.steps={steps}", "--set", f"train.lr={lr}",
                                 "--set", f"train.min_lr={lr / 10}", "--set", f"train.warmup_steps={max(1, steps // 10)}",
                                 "--set", f"train.seq_len={s['stage_seq_len']}",
                                 "--set", f"train.batch_size={s['stage_batch']}", "--set", "train.micro_batch_size=0",
                                 "--set", "train.save_every=0", "--set", f"train.log_every={max(1, steps // 20)}"], log)
        kl[stage] = kl_summary(out)
        start = out / "final"
        results[stage] = evaluate(start, tasks, depths, s["n_eval"], s["max_new_tokens"], threads, work, log, stage)
    seconds["eval"] = round(sum(r["seconds"] for r in results.values()), 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)

    cfg = json.loads((dense / "config.json").read_text())
    result = {
        "quick": quick,
        "settings": s,
        "model": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                                      "kv_lora_rank", "q_lora_rank", "vocab_size", "max_position_embeddings")},
        "params": sum(p.numel() for p in __import__("nanoseek").load(dense, dtype=torch.float32).parameters()),
        "index_topk": s["index_topk"],
        "eval": {"words": list(s["eval_words"]), "prompt_tokens": prompt_tokens(dense, tasks), "n": s["n_eval"],
                 "depths": "key at depth (i + 0.5) / n, i = 0..n-1; by_depth = thirds [0, 1/3), [1/3, 2/3), [2/3, 1]",
                 "metric": "greedy (T=0), one sample, exact key match after </think> (nanoseek eval pass@1)"},
        "sft_loss": {"first": sft_recs[0]["loss"], "last": sft_recs[-1]["loss"]},
        "results": results,
        "indexer_kl": kl,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "commands": log,
    }
    return json.loads(json.dumps(result))  # as the file will hold it (lengths as string keys)


def table(result: dict) -> str:
    """The side-by-side Markdown table of a result (as written to the JSON file)."""
    words = [str(w) for w in result["eval"]["words"]]
    toks = result["eval"]["prompt_tokens"]
    head = "| model | " + " | ".join(f"{w} words (~{toks[w]:.0f} tokens)" for w in words) + " | indexer KL (stage start -> end) |"
    lines = [head, "|---|" + "---|" * len(words) + "---|"]
    for stage in STAGES:
        r = result["results"][stage]
        acc = " | ".join(f"**{r['accuracy'][w]:.0%}** exact, {r['digit_accuracy'][w]:.0%} of digits, "
                         f"{r['format_rate'][w]:.0%} well-formed" for w in words)
        kl = result["indexer_kl"].get(stage)
        kl_text = f"{kl['first']:.3g} -> {kl['last']:.3g}" if kl else ""
        lines.append(f"| {LABELS[stage]} | {acc} | {kl_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps on short prompts: checks the pipeline only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="where to write the result (default benchmarks/results/"
                    "passkey.json, or passkey_quick.json with --quick)")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the table of a result file and exit")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a setting, e.g. --set sft_steps=400 (keys: {', '.join(FULL)})")
    args = ap.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(table(result))
        return result
    s = dict(QUICK if args.quick else FULL)
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or key not in s:
            ap.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(s)}")
        s[key] = type(s[key])(json.loads(value)) if isinstance(s[key], tuple) else type(s[key])(value)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_passkey_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(s, work, args.threads, args.quick)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    path = Path(args.json) if args.json else RESULTS / ("passkey_quick.json" if args.quick else "passkey.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
