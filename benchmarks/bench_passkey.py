"""Passkey accuracy of a small model before and after V3 -> V3.2 conversion (issue 11, item 6).

End to end through the real CLI (`nanoseek.cli.main`, in this process, so one interpreter and one torch
thread for everything):

  1. dense V3 model   `nanoseek train` briefly on the built-in corpus (the tokenizer and a starting model),
                      `nanoseek train` on passkey transcripts (the language of the prompts: LM loss on every
                      token), then `nanoseek sft` on passkey problems (a JSONL file of `make_passkey`
                      examples, the loss on the answer only), filler lengths drawn log-uniformly from
                      `train_words`; the SFT is where retrieval is learned;
  2. evaluation       `nanoseek eval --task FILE.jsonl --k 1 --temperature 0`: greedy decoding, exact key
                      match (the passkey checker: the number after `</think>`), on held-out problems at
                      two filler lengths, the key at evenly spaced depths;
  3. conversion       `nanoseek convert --to v3.2 --index-topk K` with K well below the evaluation
                      lengths, so every query late in the prompt attends to K of its ~130-160 tokens and
                      the indexer's choice decides whether the key is seen; evaluated as converted (fresh
                      indexers), after the dense warm-up (`nanoseek train --set dsa.stage=warmup`) and
                      after sparse training (`--set dsa.stage=sparse`), both on the passkey transcripts;
  4. the control      the dense model trained exactly like the sparse stage (same transcripts, steps and
                      learning rate) without DSA: what that training does to retrieval on its own.

Printed: the side-by-side table (dense V3 / converted / after warm-up / after sparse training / control) with, per
length, the exact-match accuracy, the share of key digits right and of well-formed answers, and the
indexer KL (`indexer_kl` of metrics.jsonl) and the LM loss at the start and end of each stage. The JSON holds those plus
accuracy per depth third, the settings, lengths (words and tokens), top-k, number of problems, seconds
per phase and the commands that ran; `--table FILE` prints the table of a result file.

Run: `.venv/bin/python -m benchmarks.bench_passkey --threads 1` (30-45 minutes of one core);
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
STAGES = ("dense", "converted", "warmup", "sparse", "dense_control")
LABELS = {"dense": "dense V3", "converted": "V3.2 as converted", "warmup": "after dense warm-up",
          "sparse": "after sparse training", "dense_control": "control: dense V3 trained like the sparse stage"}

# The model is `tiny` (3 layers, d=64, MoE + MTP) with room for 1K positions. FULL fits the whole benchmark
# in well under an hour of one CPU thread (most of it the LM stage and SFT); QUICK checks the pipeline in seconds.
FULL = dict(pretrain_steps=30, pretrain_docs=2000, lm_steps=1500, lm_lr=3e-3, sft_steps=1500, sft_batch=16, sft_lr=3e-3,
            train_words=(8, 64), n_train=8000, eval_words=(24, 48), n_eval=20, max_new_tokens=40, index_topk=32,
            index_n_heads=4, index_head_dim=32, stage_seq_len=256, stage_batch=8, warmup_steps=200, warmup_lr=3e-3,
            sparse_steps=200, sparse_lr=1e-3, max_position_embeddings=1024)
QUICK = dict(pretrain_steps=2, pretrain_docs=200, lm_steps=3, lm_lr=3e-3, sft_steps=6, sft_batch=4, sft_lr=3e-3, train_words=(8, 48),
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


def stage_summary(run_dir: Path) -> dict:
    """A training run's metrics.jsonl: the LM loss at its first logged step and over its last tenth, and for
    the V3.2 stages the indexer KL the same way (`first`, `last`)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = recs[-max(1, len(recs) // 10):]
    out = {"steps": recs[-1]["step"], "loss_first": _sig(recs[0]["loss"]),
           "loss_last": _sig(sum(r["loss"] for r in tail) / len(tail))}
    if "indexer_kl" in recs[0]:
        out.update(first=_sig(recs[0]["indexer_kl"]), last=_sig(sum(r["indexer_kl"] for r in tail) / len(tail)))
    return out


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


def stage_sets(init: Path, data: Path, steps: int, lr: float, s: dict) -> list[str]:
    """`nanoseek train --set` overrides of a run from `init` on the transcripts `data` (LM stage and V3.2 stages)."""
    sets = {"train.init_from": init, "data.source": data, "train.steps": steps, "train.lr": lr, "train.min_lr": lr / 10,
            "train.warmup_steps": max(1, steps // 10), "train.seq_len": s["stage_seq_len"],
            "train.batch_size": s["stage_batch"], "train.micro_batch_size": 0, "train.save_every": 0,
            "train.log_every": max(1, steps // 20)}
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


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
    # the passkey transcripts: the language of the prompts (before SFT) and the data of both V3.2 stages
    write_problems(work / "stage.jsonl", s["n_train"], tuple(s["train_words"]), seed=2, fmt="text")
    base = work / "pretrain" / "final"
    if s["lm_steps"]:
        seconds["lm"], _ = cli(["train", "--config", config, "--out", str(work / "lm"), *common,
                                *stage_sets(base, work / "stage.jsonl", s["lm_steps"], s["lm_lr"], s)], log)
        base = work / "lm" / "final"
    write_problems(work / "sft.jsonl", s["n_train"], tuple(s["train_words"]), seed=1, fmt="task")
    dense = work / "dense"
    seconds["sft"], _ = cli(["sft", "--model", str(base), "--data", str(work / "sft.jsonl"),
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

    # 3. the two V3.2 training stages on the passkey transcripts
    kl, training = {}, {}
    start = v32
    for stage, steps, lr in (("warmup", s["warmup_steps"], s["warmup_lr"]), ("sparse", s["sparse_steps"], s["sparse_lr"])):
        out = work / stage
        seconds[stage], _ = cli(["train", "--config", config, "--out", str(out), *common, "--set", f"dsa.stage={stage}",
                                 *stage_sets(start, work / "stage.jsonl", steps, lr, s)], log)
        kl[stage] = stage_summary(out)
        start = out / "final"
        results[stage] = evaluate(start, tasks, depths, s["n_eval"], s["max_new_tokens"], threads, work, log, stage)
    # 4. the control: the dense model trained exactly like the sparse stage (same data, steps, lr) without
    # DSA, so what that training does to retrieval by itself is told apart from what sparse attention does
    out = work / "dense_control"
    seconds["dense_control"], _ = cli(["train", "--config", config, "--out", str(out), *common,
                                       *stage_sets(dense, work / "stage.jsonl", s["sparse_steps"], s["sparse_lr"], s)], log)
    training["dense_control"] = stage_summary(out)
    results["dense_control"] = evaluate(out / "final", tasks, depths, s["n_eval"], s["max_new_tokens"], threads, work,
                                        log, "dense_control")
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
        "training": {**({"lm": stage_summary(work / "lm")} if s["lm_steps"] else {}), **training},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "commands": log,
    }
    return json.loads(json.dumps(result))  # as the file will hold it (lengths as string keys)


def table(result: dict) -> str:
    """The side-by-side Markdown table of a result (as written to the JSON file)."""
    words = [str(w) for w in result["eval"]["words"]]
    toks = result["eval"]["prompt_tokens"]
    head = ("| model | " + " | ".join(f"{w} words (~{toks[w]:.0f} tokens)" for w in words) +
            " | indexer KL (stage start -> end) | LM loss on the transcripts (start -> end) |")
    lines = [head, "|---|" + "---|" * len(words) + "---|---|"]
    for stage in (st for st in STAGES if st in result["results"]):  # files of older runs lack the control
        r = result["results"][stage]
        acc = " | ".join(f"**{r['accuracy'][w]:.0%}** exact, {r['digit_accuracy'][w]:.0%} of digits, "
                         f"{r['format_rate'][w]:.0%} well-formed" for w in words)
        run = result["indexer_kl"].get(stage) or result.get("training", {}).get(stage)
        kl_text = f"{run['first']:.3g} -> {run['last']:.3g}" if run and "first" in run else ""
        loss_text = f"{run['loss_first']:.3g} -> {run['loss_last']:.3g}" if run and "loss_first" in run else ""
        lines.append(f"| {LABELS[stage]} | {acc} | {kl_text} | {loss_text} |")
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
