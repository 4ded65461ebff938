"""`nanoseek speedrun --out DIR`: the whole DeepSeek-V3 -> R1 pipeline on the built-in data, end to end.

  1 tokenizer   byte-level BPE on the generated corpus (nanoseek.data)
  2 pretrain    a small MoE with MLA and MTP through the training engine (nanoseek.train, V3 report)
  3 SFT         cold start on the task's worked solutions in the <think> format (R1 section 2.3.1)
  4 eval        held-out pass@1 / cons@k of the SFT model
  5 GRPO        RL with rule rewards (R1 section 2.2; nanoseek.rl.trainer lists its departures)
  6 eval        the same held-out problems, same samples settings
  7 export      a HF deepseek_v3 directory with the tokenizer and chat template

Every setting lives in one TOML file (configs/speedrun.toml: the pretraining sections of a
`nanoseek train` config plus [speedrun], [sft], [eval], [grpo]); `--set section.key=value` overrides
any key and `--quick` swaps in a model and step counts small enough for a one-minute smoke run.
Outputs: DIR/report.json (accuracy before/after RL, stage times, tokens/s, MFU, cost projection),
DIR/report.md with the plots under DIR/plots, and the exported model in DIR/model.

The task is Countdown at difficulty 1 (three numbers up to 9), TinyZero's RL task: many expressions are
correct, so the SFT model's samples find rewards that GRPO can reinforce. Measured on 2 shared cores:
held-out pass@1 30.0% after SFT -> 50.5% after 80 GRPO steps, 8 minutes end to end. Multi-step
arithmetic was tried first: its SFT model improved with more SFT but not with GRPO (one correct answer
per problem, errors in memorised facts that a few hundred rollouts cannot fix), and at learning rates
that moved it at all the policy collapsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.config_io import apply_sets, from_table, read_toml, split_set, suggest, typed_values
from nanoseek.rl.sft import SFTConfig
from nanoseek.rl.trainer import GRPOConfig
from nanoseek.train.config import SECTIONS as TRAIN_SECTIONS
from nanoseek.train.config import RunConfig, apply_overrides, build

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "speedrun.toml"

# A model and step counts for a ~1 minute smoke run (tests use it).
QUICK = [
    "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.num_attention_heads=2",
    "data.n_docs=400", "data.vocab_size=320", "train.steps=12", "train.batch_size=8", "train.seq_len=64",
    "train.warmup_steps=2", "train.log_every=4", "sft.steps=8", "sft.batch_size=8", "sft.n_examples=64",
    "eval.n=12", "eval.k=2", "eval.max_new_tokens=40", "eval.base=false",
    "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.G=4", "grpo.max_new_tokens=40", "speedrun.threads=1",
]


@dataclasses.dataclass
class SpeedrunConfig:
    task: str = "countdown"
    difficulty: int = 1
    threads: int = 0            # torch threads; 0 = one per core not already busy (see idle_cores)


@dataclasses.dataclass
class SFTStage(SFTConfig):
    n_examples: int = 2000      # worked solutions drawn from the task's train split


@dataclasses.dataclass
class EvalConfig:
    n: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    base: bool = True           # also evaluate the pretrained model (before SFT)
    seed: int = 0


# The speedrun's own sections; the others are a `nanoseek train` run config (nanoseek.train.config).
OWN_SECTIONS: dict[str, type] = {"speedrun": SpeedrunConfig, "sft": SFTStage, "eval": EvalConfig, "grpo": GRPOConfig}


@dataclasses.dataclass
class Plan:
    run: RunConfig              # pretraining
    speedrun: SpeedrunConfig
    sft: SFTStage
    eval: EvalConfig
    grpo: GRPOConfig


def load_plan(path: str | Path | None, overrides: list[str]) -> Plan:
    """The speedrun's settings: the TOML file, then each `section.key=value` override."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError(f"speedrun config {p} not found (pass --config FILE)")
    src = str(p)
    doc = read_toml(p)
    own = {s: doc.pop(s, {}) for s in OWN_SECTIONS}
    own_sets, train_sets = [], []
    for item in overrides:
        section, key, _ = split_set(item)
        if section not in OWN_SECTIONS and section != "model" and section not in TRAIN_SECTIONS:
            raise ConfigError(f"--set {section}.{key}: unknown section {section!r}{suggest(section, [*OWN_SECTIONS, *TRAIN_SECTIONS])}"
                              f"; expected one of {sorted(['model', *TRAIN_SECTIONS, *OWN_SECTIONS])}")
        (own_sets if section in OWN_SECTIONS else train_sets).append(item)
    own = apply_sets(own, own_sets, OWN_SECTIONS)
    run = build(apply_overrides(doc, train_sets), source=src)
    sr = from_table(SpeedrunConfig, own["speedrun"], "speedrun", src)
    sft = from_table(SFTStage, own["sft"], "sft", src).validate()
    ev = from_table(EvalConfig, own["eval"], "eval", src)
    for key in ("task", "difficulty"):  # one task for SFT, eval and GRPO alike
        if key in own["grpo"]:
            raise ConfigError(f"{src}: grpo.{key} is taken from speedrun.{key} (one task for SFT, eval and GRPO); "
                              "set that instead")
    grpo = GRPOConfig(**typed_values(GRPOConfig, own["grpo"], "grpo", src), task=sr.task,
                      difficulty=sr.difficulty).validate()
    return Plan(run, sr, sft, ev, grpo)


def idle_cores() -> int:
    """Cores not already kept busy by other processes (1-minute load average), at least 1.

    On a shared machine more torch threads than idle cores is far slower than fewer: OpenMP's barriers
    spin while the threads wait for a core (measured here: 10x on 2 cores with a load of 8).
    """
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n
    return max(1, min(n, n - int(load + 0.5)))


# ----------------------------------------------------------------------------- reporting helpers
def _throughput(metrics_path: Path) -> tuple[float, float]:
    """(tokens/s, MFU) of a pretraining run: total over the logged intervals after the first step."""
    from nanoseek.train.metrics import read_metrics

    recs = read_metrics(metrics_path)
    pairs = [(b["tokens"] - a["tokens"], b["tokens_per_s"], b.get("mfu", 0.0)) for a, b in zip(recs, recs[1:])]
    if not pairs:
        return (recs[-1]["tokens_per_s"], recs[-1].get("mfu", 0.0)) if recs else (0.0, 0.0)
    tokens = sum(t for t, _, _ in pairs)
    seconds = sum(t / max(tps, 1e-9) for t, tps, _ in pairs)
    mfu = sum(t / max(tps, 1e-9) * m for t, tps, m in pairs) / max(seconds, 1e-9)
    return tokens / max(seconds, 1e-9), mfu


def _plots(out: Path, pre: Path, sft_recs: list[dict], grpo_hist: list[dict], evals: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.rl.trainer import plot_grpo
    from nanoseek.train.metrics import read_metrics

    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    recs = read_metrics(pre / "metrics.jsonl")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if recs:
        a1.plot([r["tokens"] for r in recs], [r["loss"] for r in recs], label="LM loss")
        a1.plot([r["tokens"] for r in recs], [r["mtp_loss"] for r in recs], label="MTP loss", alpha=0.8)
    a1.set_title("pretraining")
    a1.set_xlabel("tokens")
    a1.set_ylabel("cross-entropy (nats)")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot([r["step"] for r in sft_recs], [r["loss"] for r in sft_recs], color="tab:green")
    a2.set_title("cold-start SFT (completion tokens)")
    a2.set_xlabel("step")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "loss.png", dpi=100)
    plt.close(fig)
    files["loss"] = "plots/loss.png"
    if plot_grpo(grpo_hist, d / "reward.png"):
        files["reward"] = "plots/reward.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n in ("base", "sft", "grpo") if n in evals]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [evals[n]["pass_at_1"] for n in names], width=0.4, label="pass@1")
    ax.bar([x + 0.2 for x in xs], [evals[n]["cons_at_k"] for n in names], width=0.4, label="cons@k")
    ax.set_xticks(list(xs), [{"base": "pretrained", "sft": "SFT", "grpo": "SFT + GRPO"}[n] for n in names])
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(d / "accuracy.png", dpi=100)
    plt.close(fig)
    files["accuracy"] = "plots/accuracy.png"
    if (pre / "expert_load.png").is_file():
        shutil.copy2(pre / "expert_load.png", d / "expert_load.png")
        files["expert_load"] = "plots/expert_load.png"
    return files


def _markdown(report: dict, plots: dict[str, str], samples: dict[str, list[dict]]) -> str:
    ev = report["evals"]
    k = report["config"]["eval"]["k"]
    lines = ["# nanoseek speedrun", "",
             f"Task **{report['task']}** (difficulty {report['difficulty']}), {ev['sft']['n']} held-out problems, "
             f"{k} samples each at temperature {report['config']['eval']['temperature']}.", "",
             "| model | pass@1 | cons@k | format | mean length |", "|---|---|---|---|---|"]
    for name, label in (("base", "pretrained"), ("sft", "cold-start SFT"), ("grpo", "SFT + GRPO")):
        if name in ev:
            e = ev[name]
            lines.append(f"| {label} | {e['pass_at_1']:.1%} | {e['cons_at_k']:.1%} | {e['format_rate']:.1%} | "
                         f"{e['mean_length']:.1f} |")
    lines += ["", f"GRPO changed held-out pass@1 by **{100 * (report['accuracy_after_rl'] - report['accuracy_before_rl']):+.1f}"
              " points**.", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {t:.1f} |" for s, t in report["stage_seconds"].items()]
    lines += [f"| **total** | **{report['total_seconds']:.1f}** |", "",
              f"Pretraining: {report['params']:,} parameters, {report['pretrain_tokens']:,} tokens at "
              f"{report['tokens_per_s']:.0f} tokens/s, MFU {report['mfu']:.1%} of this machine's measured fp32 matmul peak.",
              ""]
    c = report["cost_projection"]
    lines += [f"Cost projection: this pretraining ({c['total_flops']:.3g} FLOPs) would take {c['gpu_hours'] * 3600:.2f} "
              f"H800 GPU-seconds at {c['mfu']:.0%} MFU (${c['cost_usd']:.6f} at ${c['price_per_gpu_hour']}/GPU-hour).", ""]
    for key, title in (("loss", "Loss"), ("reward", "GRPO reward, accuracy, format and response length"),
                       ("accuracy", "Held-out accuracy"), ("expert_load", "Expert load (pretraining)")):
        if key in plots:
            lines += [f"## {title}", "", f"![{title}]({plots[key]})", ""]
    for name, rows in samples.items():
        lines += [f"## Samples after {name}", ""]
        for s in rows[:3]:
            lines += [f"**{s['prompt']}** (reference {s['reference']}, {'correct' if s['correct'][0] else 'wrong'})",
                      "", "```", s["completion"], "```", ""]
    lines += ["## Chat with it", "", "```", f"nanoseek chat --model {report['model_dir']}",
              f"nanoseek serve --model {report['model_dir']}", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def speedrun(out: str | Path, plan: Plan, progress: bool = True) -> dict:
    import torch

    import nanoseek
    from nanoseek import mfu as mfu_mod
    from nanoseek.accounting import training_flops_per_token
    from nanoseek.cost import project
    from nanoseek.data.tasks import get_task
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.rl.evaluate import evaluate
    from nanoseek.rl.sft import load_sft_data, sft_train
    from nanoseek.rl.trainer import GRPOTrainer
    from nanoseek.train.loop import train
    from nanoseek.train.prepare import prepare_data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sr = plan.speedrun
    torch.set_num_threads(sr.threads or idle_cores())
    print(f"{torch.get_num_threads()} torch thread(s)", file=sys.stderr)
    task = get_task(sr.task)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(i: int, name: str) -> None:
        print(f"\n[{i}/7] {name}", file=sys.stderr, flush=True)

    stage(1, "train the tokenizer (and tokenize the built-in corpus)")
    pre = out / "pretrain"
    if pre.exists():
        shutil.rmtree(pre)  # the speedrun always starts afresh
    t = time.perf_counter()
    tok, tok_dir, _ = prepare_data(plan.run.data, pre, progress=progress, log=lambda m: print(m, file=sys.stderr))
    times["tokenizer"] = time.perf_counter() - t

    stage(2, "pretrain a small MoE with MLA and MTP")
    t = time.perf_counter()
    final = train(plan.run, pre, progress=progress)
    times["pretrain"] = time.perf_counter() - t
    tps, mfu = _throughput(pre / "metrics.jsonl")
    model = nanoseek.load(final, dtype=torch.float32)
    ev_kw = dict(n=plan.eval.n, k=plan.eval.k, difficulty=sr.difficulty, temperature=plan.eval.temperature,
                 top_p=plan.eval.top_p, max_new_tokens=plan.eval.max_new_tokens, seed=plan.eval.seed,
                 progress=progress)
    evals: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}

    def run_eval(stage_name: str, key: str, label: str, keep_samples: bool = True) -> None:
        t0 = time.perf_counter()
        res = evaluate(model, tok, task, **ev_kw)
        times[stage_name] = time.perf_counter() - t0
        evals[key] = res.to_dict()
        if keep_samples:
            samples[label] = res.samples
        print(f"{label}: pass@1 {res.pass_at_1:.1%}, cons@{res.k} {res.cons_at_k:.1%}, format {res.format_rate:.1%}",
              file=sys.stderr)

    if plan.eval.base:
        run_eval("eval_base", "base", "pretrained", keep_samples=False)

    stage(3, f"cold-start SFT on {sr.task} (difficulty {sr.difficulty})")
    t = time.perf_counter()
    pairs = load_sft_data(sr.task, tok, n=plan.sft.n_examples, difficulty=sr.difficulty, seed=plan.run.train.seed)
    torch.manual_seed(plan.sft.seed)
    sft_recs = sft_train(model, pairs, plan.sft, tok.pad_id, progress=progress)
    nanoseek.save(model, out / "sft", tokenizer_dir=tok_dir)
    times["sft"] = time.perf_counter() - t

    stage(4, "evaluate the SFT model on held-out problems")
    run_eval("eval_before_rl", "sft", "SFT")

    stage(5, f"GRPO: {plan.grpo.steps} steps x {plan.grpo.prompts_per_step} prompts x G={plan.grpo.G}")
    t = time.perf_counter()
    grpo_dir = out / "grpo"
    if grpo_dir.exists():
        shutil.rmtree(grpo_dir)
    trainer = GRPOTrainer(model, tok, plan.grpo, out_dir=grpo_dir, tokenizer_dir=tok_dir, progress=progress, task=task)
    history = trainer.train()
    times["grpo"] = time.perf_counter() - t

    stage(6, "evaluate the GRPO model on the same held-out problems")
    run_eval("eval_after_rl", "grpo", "GRPO")

    stage(7, "export a Hugging Face directory with the tokenizer and chat template")
    t = time.perf_counter()
    model_dir = out / "model"
    tmp = out / ".tmp-model"
    if tmp.exists():
        shutil.rmtree(tmp)
    nanoseek.save(model, tmp, tokenizer_dir=tok_dir)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.rename(tmp, model_dir)
    nanoseek.load(model_dir)  # the exported directory must load back
    load_tokenizer(model_dir)
    times["export"] = time.perf_counter() - t

    total = time.perf_counter() - t_all
    t_cfg = plan.run.train
    tokens = t_cfg.steps * t_cfg.batch_size * t_cfg.seq_len
    fpt = training_flops_per_token(model.config, t_cfg.seq_len)
    cost = project(fpt, tokens, mfu_mod.peak_flops("H800"), 0.4)
    report = {
        "task": sr.task, "difficulty": sr.difficulty,
        "accuracy_before_rl": evals["sft"]["pass_at_1"], "accuracy_after_rl": evals["grpo"]["pass_at_1"],
        "cons_before_rl": evals["sft"]["cons_at_k"], "cons_after_rl": evals["grpo"]["cons_at_k"],
        "accuracy_base": evals.get("base", {}).get("pass_at_1"),
        "model_dir": str(model_dir.resolve()),
        "stage_seconds": times, "total_seconds": total,
        "params": model.num_params(), "pretrain_tokens": tokens, "tokens_per_s": tps, "mfu": mfu,
        "flops_per_token": fpt,
        "cost_projection": {**dataclasses.asdict(cost), "gpu": "H800", "assumption": "pretraining FLOPs of this run "
                            "on one H800 at 40% MFU, $2 per GPU-hour (the V3 report's price)"},
        "grpo_final": {k: v for k, v in (history[-1] if history else {}).items() if k != "sample"},
        "grpo_history": [{k: v for k, v in r.items() if k != "sample"} for r in history],
        "evals": evals,
        "config": {"speedrun": dataclasses.asdict(sr), "sft": dataclasses.asdict(plan.sft),
                   "eval": dataclasses.asdict(plan.eval), "grpo": dataclasses.asdict(plan.grpo),
                   "pretrain": plan.run.to_dict()},
    }
    plots = _plots(out, pre, sft_recs, history, evals)
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report, plots, samples))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (report.json, report.md, plots/, model/)")
    parser.add_argument("--config", default=None, help=f"speedrun TOML (default {DEFAULT_CONFIG})")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a ~1 minute smoke run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key, e.g. --set grpo.steps=10 or --set train.steps=50 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.config, (QUICK if args.quick else []) + list(args.sets))
    except (ValueError, ConfigError) as e:
        print(f"nanoseek speedrun: config error: {e}", file=sys.stderr)
        return 2
    report = speedrun(args.out, plan, progress=not args.no_progress)
    before, after = report["accuracy_before_rl"], report["accuracy_after_rl"]
    md = Path(args.out) / "report.md"
    print(f"\nheld-out pass@1: {before:.1%} after SFT -> {after:.1%} after GRPO ({100 * (after - before):+.1f} points)")
    print(f"total {report['total_seconds']:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds"].items()))
    print(f"report: {md}")
    print(f"\nchat with the result:\n  nanoseek chat --model {report['model_dir']}\n"
          f"  nanoseek serve --model {report['model_dir']}   # OpenAI-compatible API + web chat")
    return 0
