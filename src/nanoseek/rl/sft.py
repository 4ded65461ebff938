"""Supervised fine-tuning on chat data with the loss on assistant tokens only (the R1 cold start).

DeepSeek-R1 (arXiv 2501.12948, section 2.3.1) fine-tunes the base model on a small set of long
chain-of-thought examples in the `<think>...</think>` format before RL, so that RL starts from a model
that already answers readably; section 2.3.3 does the same with rejection-sampled traces (and
nanoseek.rl.distill reuses `sft_train` for that). Each example is a (prompt ids, completion ids) pair:
the prompt is the chat template up to the opened think block (nanoseek.data.chat.render_prompt), the
completion is `reasoning\\n</think>\\nanswer<eos>`. Only completion tokens carry loss (targets of prompt
and padding positions are -100), so the model is never trained to write the user's turn.

Data (`load_sft_data`): a built-in task name (its train split's worked solutions become the think
traces), or a JSONL file whose lines are any of
  {"messages": [..., {"role": "assistant", "content": "<think>r</think>a" | "a", "reasoning_content": "r"}]}
  {"prompt": "question", "completion": "text after the opened <think>\\n"}
  {"prompt": "question", "answer": "a", "solution": "r"}          (the task JSONL format)

Training: the optimizer step every trainer shares (nanoseek.train.step: AdamW with weight decay on matrices
only, linear warm-up then cosine decay, grad clip, a NaN/inf guard), MTP loss kept on (so the fine-tuned
model can still draft for speculative decoding), and the aux-loss-free routing bias kept balancing as in
pretraining (nanoseek.train.balance).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.data.chat import EOS, encode_sft, render_completion, render_prompt
from nanoseek.data.tasks import TASKS, get_task
from nanoseek.config import ConfigError
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import DataError, PathNotFound

Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids)


@dataclass
class SFTConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_update_speed: float = 0.001
    max_len: int = 512          # longer prompt + completion pairs are dropped (with a count in the log)
    seed: int = 0
    log_every: int = 10

    def validate(self) -> "SFTConfig":
        for k in ("steps", "batch_size", "max_len", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"sft {k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"sft lr must be > 0 and min_lr in [0, lr], got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.mtp_weight < 0:
            raise ConfigError("sft warmup_steps, weight_decay, grad_clip and mtp_weight must be >= 0")
        return self


# ----------------------------------------------------------------------------- data
def _assistant_parts(content: str, reasoning: str | None) -> tuple[str, str]:
    if "</think>" in content:
        r, _, a = content.partition("</think>")
        return r.replace("<think>", "", 1).strip(), a.strip()
    return (reasoning or "").strip(), content.strip()


def _pair_from_row(obj: object, tok: Tokenizer, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        last = msgs[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise DataError(f"{where}: the last message must be the assistant's reply (role 'assistant' with content)")
        if len(msgs) < 2:
            raise DataError(f"{where}: 'messages' needs at least one user message before the assistant's reply")
        reasoning, answer = _assistant_parts(last["content"], last.get("reasoning_content"))
        if not answer:
            raise DataError(f"{where}: the assistant's reply has no answer after its reasoning")
        return render_prompt(msgs[:-1], tok), tok.encode(render_completion(reasoning, answer))
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise DataError(f"{where}: expected 'messages', or a non-empty string 'prompt' with 'completion' or 'answer'")
    if isinstance(obj.get("completion"), str):
        text = obj["completion"]
        if not text.strip():
            raise DataError(f"{where}: 'completion' is empty")
        if not text.endswith(EOS):
            text += EOS
        return render_prompt(obj["prompt"], tok), tok.encode(text)
    if "answer" in obj and str(obj["answer"]).strip():
        return encode_sft(obj["prompt"], str(obj.get("solution", "")), str(obj["answer"]), tok)
    raise DataError(f"{where}: a 'prompt' row needs a 'completion' or an 'answer'")


def load_sft_data(data: str, tok: Tokenizer, n: int = 2000, difficulty: int = 1, seed: int = 0) -> list[Pair]:
    """(prompt ids, completion ids) pairs from a built-in task's train split or a JSONL chat file."""
    if data in TASKS:
        examples = get_task(data).examples("train", n, seed=seed, difficulty=difficulty)
        return [encode_sft(ex.prompt, ex.solution, ex.answer, tok) for ex in examples]
    p = Path(data)
    if not p.is_file():
        raise PathNotFound(f"SFT data {data!r} is neither a built-in task {sorted(TASKS)} nor a file",
                           hint="pass a task name or a JSONL chat file")
    pairs = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        pairs.append(_pair_from_row(obj, tok, f"{p}:{lineno}"))
    if not pairs:
        raise DataError(f"{p}: no examples found")
    return pairs


def sft_tensors(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, T], targets [B, T]); targets are -100 except on completion tokens.

    Row i is prompt + completion minus its last token; target t is token t + 1 of the full row, kept only
    where that token belongs to the completion.
    """
    rows = [list(p) + list(c) for p, c in pairs]
    T = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, ((p, c), r) in enumerate(zip(pairs, rows)):
        if not p or not c:
            raise DataError(f"SFT example {i} has an empty prompt or completion")
        n = len(r) - 1
        ids[i, :n] = torch.tensor(r[:-1])
        targets[i, len(p) - 1:n] = torch.tensor(c)
    return ids, targets


# ----------------------------------------------------------------------------- training
def sft_train(model: torch.nn.Module, pairs: list[Pair], cfg: SFTConfig, pad_id: int, progress: bool = True,
              on_log: Callable[[dict], None] | None = None, desc: str = "sft") -> list[dict]:
    """Fine-tune `model` in place on the completion tokens of `pairs`; returns the logged records.

    The optimizer step is nanoseek.train.step's: the LR warms up then decays along a cosine over all the
    steps (decay_frac 1), and a NaN/inf loss or gradient norm raises NonFiniteLoss naming the step.
    """
    from tqdm.auto import tqdm

    from nanoseek.train.optim import OptimConfig
    from nanoseek.train.step import TrainStep

    cfg.validate()
    kept = [pr for pr in pairs if len(pr[0]) + len(pr[1]) <= cfg.max_len]
    if not kept:
        raise ConfigError(f"every SFT example is longer than max_len={cfg.max_len} tokens", hint="raise --max-len")
    if len(kept) < len(pairs):
        print(f"{desc}: dropped {len(pairs) - len(kept)} of {len(pairs)} examples longer than {cfg.max_len} tokens",
              file=sys.stderr)
    rng = random.Random(f"sft:{cfg.seed}")
    order: list[int] = []
    model.train()
    # decay_frac 1: cosine over every step after the warm-up; the fused AdamW kernel (build_optimizer's
    # default: faster on a CPU, and the same per-element arithmetic however the parameters are grouped).
    stepper = TrainStep(model, OptimConfig.of(cfg, decay_frac=1.0), bias_update_speed=cfg.bias_update_speed,
                        name=desc)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = model.forward_train(*batch, mtp_weight=cfg.mtp_weight, aux_alpha=0.0)
        return out.loss, {"loss": out.lm_loss, "mtp_loss": out.mtp_loss}

    records: list[dict] = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not progress)
    dev = next(model.parameters()).device  # batches are built on the host; the model may live on a GPU
    for step in bar:
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:  # epochs: a fresh permutation each time the data runs out
                order = list(range(len(kept)))
                rng.shuffle(order)
            batch.append(kept[order.pop()])
        ids, targets = (t.to(dev, non_blocking=True) for t in sft_tensors(batch, pad_id))
        rec = stepper(step, [(ids, targets)], loss_fn, tokens=int(ids.numel()))
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or step == 0:
            rec = {"step": step + 1, **rec, "tokens_per_s": stepper.throughput()}
            records.append(rec)
            if on_log:
                on_log(rec)
    bar.close()
    model.eval()
    return records


def completion_loss(model: torch.nn.Module, pairs: list[Pair], pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per completion token (no gradient): how well the model fits the pairs."""
    total, count = 0.0, 0
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            ids, targets = (t.to(dev) for t in sft_tensors(pairs[i:i + batch_size], pad_id))
            logits = model(ids)
            n = int((targets != -100).sum())
            total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += n
    return total / max(count, 1)
