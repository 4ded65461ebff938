"""The speedrun's report: DIR/report.json (every number of the run), DIR/report.md and the plots under DIR/plots.

`build_report` gathers what the stages measured (held-out accuracy before and after RL, stage times,
pretraining tokens/s and MFU, a cost projection of the pretraining FLOPs on an H800) with the whole
configuration; `write_report` draws the plots and writes both files. The README's speedrun table quotes
one such report.json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any


def throughput(metrics_path: Path) -> tuple[float, float]:
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


def plots(out: Path, pre: Path, sft_recs: list[dict], grpo_hist: list[dict], evals: dict) -> dict[str, str]:
    """The PNGs under DIR/plots (losses, GRPO reward, held-out accuracy, expert load); name -> relative path."""
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


def markdown(report: dict, plots: dict[str, str], samples: dict[str, list[dict]]) -> str:
    """report.md: the accuracy table, stage times, throughput and cost, the plots and a few samples."""
    ev = report["evals"]
    k = report["config"]["eval"]["k"]
    m = report.get("machine", {})
    where = f"{m['gpu']} ({m['device']})" if m.get("gpu") else f"{m.get('device', '?')} ({m.get('cpu', '?')})"
    # The training loop's MFU peak (nanoseek.device.device_peak_flops): a known GPU's table figure, else measured.
    peak = "the GPU's dense BF16 peak" if m.get("gpu") else "this machine's measured matmul peak"
    lines = ["# nanoseek speedrun", "", f"Config `{report.get('config_file', '?')}` on {where}, torch {m.get('torch', '?')}.",
             "",
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
              f"{report['tokens_per_s']:.0f} tokens/s, MFU {report['mfu']:.1%} of {peak}.",
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


def build_report(plan: Any, model: Any, evals: dict[str, dict], history: list[dict], times: dict[str, float],
                 total: float, pretrain_metrics: Path, model_dir: Path) -> dict:
    """report.json's contents."""
    from nanoseek import mfu as mfu_mod
    from nanoseek.accounting import training_flops_per_token
    from nanoseek.cost import project

    sr, t_cfg = plan.speedrun, plan.run.train
    tps, mfu = throughput(pretrain_metrics)
    tokens = t_cfg.steps * t_cfg.batch_size * t_cfg.seq_len
    fpt = training_flops_per_token(model.config, t_cfg.seq_len)
    cost = project(fpt, tokens, mfu_mod.peak_flops("H800"), 0.4)
    return {
        "task": sr.task, "difficulty": sr.difficulty, "config_file": getattr(plan, "source", ""),
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


def write_report(out: Path, report: dict, pre: Path, sft_recs: list[dict], history: list[dict],
                 samples: dict[str, list[dict]]) -> dict:
    """Draw the plots, then write DIR/report.json and DIR/report.md; returns the report with its plots."""
    report["plots"] = plots(out, pre, sft_recs, history, report["evals"])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, report["plots"], samples))
    return report
