"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard when installed, and
the end-of-run plots (loss curve, per-layer expert-load heatmap; matplotlib's Agg backend, no display).

On resume the log is cut back to the checkpoint's step first (lines a killed run wrote after its last
checkpoint, including a half-written last line, are dropped), so the finished log reads as if the run
had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only the records with step <= `step` (write-then-rename: a kill here loses nothing)."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p) if r["step"] <= step]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, p)


class MetricsLogger:
    """Appends records to metrics.jsonl (flushed per line) and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (the dev extra installs it)
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Loss and MTP loss against tokens, with max_vio below; None when there is nothing to plot."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = [r.get("tokens", r["step"]) for r in recs]
    ax.plot(x, [r["loss"] for r in recs], label="LM loss")
    if any(r.get("mtp_loss") for r in recs):
        ax.plot(x, [r.get("mtp_loss", float("nan")) for r in recs], label="MTP loss", alpha=0.8)
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"training loss (last: {recs[-1]['loss']:.4f} at step {recs[-1]['step']})")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot(x, [r.get("max_vio", float("nan")) for r in recs], color="tab:red")
    ax2.set_ylabel("max_vio")
    ax2.set_xlabel("tokens")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_expert_load(loads_LE: torch.Tensor, layer_names: list[str], out_png: str | Path, title: str) -> Path:
    """Heatmap of each layer's expert loads relative to that layer's mean (1.0 = balanced)."""
    plt = _pyplot()
    rel = loads_LE.float() / loads_LE.float().mean(dim=1, keepdim=True).clamp_min(1e-12)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.35 * E), 1.5 + 0.45 * L))
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="coolwarm", vmin=0, vmax=max(2.0, float(rel.max())))
    ax.set_yticks(range(L), layer_names)
    ax.set_xlabel("routed expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
