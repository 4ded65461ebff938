"""Distillation by rejection sampling: the teacher samples, only verified-correct traces are kept, and a
student is fine-tuned on them.

DeepSeek-R1 (arXiv 2501.12948, sections 2.3.3 and 2.4) rejection-samples the RL checkpoint, keeps only
responses whose answers are correct (and readable), and fine-tunes smaller dense models on the ~800K
kept samples with plain SFT (no RL for the students). Here: the teacher draws k completions per
train-split problem in one batched engine call; a completion is kept only when it parses strictly
(nanoseek.data.chat.parse_completion) AND its answer passes the task's checker; identical traces of the
same problem are kept once. The student (a fresh model of any config, or an existing model directory)
is then trained with nanoseek.rl.sft.sft_train on exactly those token sequences (the teacher's own
tokens, so nothing is lost re-tokenizing), and the traces are also written as JSONL usable by
`nanoseek sft --data`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.data.chat import parse_completion, render_prompt
from nanoseek.data.tasks import Task, check_answer
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.rl.sft import Pair


@dataclass
class RejectionStats:
    problems: int
    sampled: int
    kept: int
    well_formed: int
    correct: int
    problems_covered: int  # problems with at least one kept trace

    @property
    def keep_rate(self) -> float:
        return self.kept / self.sampled if self.sampled else 0.0


def select_traces(examples: list, texts: list[list[str]]) -> list[list[int]]:
    """Indices of the completions to keep for each problem: strictly formatted, correct, not a duplicate."""
    keep = []
    for ex, row in zip(examples, texts):
        seen: set[str] = set()
        mine = []
        for j, text in enumerate(row):
            p = parse_completion(text)
            if p.well_formed and check_answer(p.answer, ex) and text not in seen:
                seen.add(text)
                mine.append(j)
        keep.append(mine)
    return keep


def rejection_sample(teacher: torch.nn.Module, tok: Tokenizer, task: Task, n: int, k: int = 4, difficulty: int = 1,
                     temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 128, seed: int = 0,
                     max_batch_size: int = 128) -> tuple[list[Pair], list[dict], RejectionStats]:
    """(training pairs, JSONL rows, stats) of the teacher's verified traces on `n` train problems."""
    from nanoseek.infer import Engine, SamplingParams

    examples = task.examples("train", n, seed=seed, difficulty=difficulty)
    prompts = [render_prompt(ex.prompt, tok) for ex in examples]
    flat = [p for p in prompts for _ in range(k)]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed * 7919 + i,
                             stop_token_ids=[tok.eos_id]) for i in range(len(flat))]
    max_len = min(max(len(p) for p in flat) + max_new_tokens, teacher.config.max_position_embeddings)
    engine = Engine(teacher.eval(), max_batch_size=min(len(flat), max_batch_size), max_len=max_len)
    outs = engine.generate_batch(flat, params)  # every sample in one batched call
    ids = [[outs[i * k + j].token_ids for j in range(k)] for i in range(len(examples))]
    texts = [[tok.decode(c) for c in row] for row in ids]
    keep = select_traces(examples, texts)
    pairs, rows = [], []
    wf = cor = 0
    for ex, prompt, row_ids, row_txt, kept in zip(examples, prompts, ids, texts, keep):
        for t in row_txt:
            p = parse_completion(t)
            wf += p.well_formed
            cor += bool(p.answer) and check_answer(p.answer, ex)
        for j in kept:
            pairs.append((prompt, row_ids[j]))
            rows.append({"prompt": ex.prompt, "completion": row_txt[j], "answer": ex.answer})
    stats = RejectionStats(problems=len(examples), sampled=len(flat), kept=len(pairs), well_formed=wf, correct=cor,
                           problems_covered=sum(1 for kp in keep if kp))
    return pairs, rows, stats


def build_student(spec: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A fresh student from a preset name, a config JSON/TOML file, or an existing model directory."""
    import nanoseek
    from nanoseek.config import PRESETS, ConfigError, preset
    from nanoseek.model import Transformer

    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        model = nanoseek.load(p, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"student {p} has vocab_size {model.config.vocab_size} < the teacher's {vocab_size}")
        return model
    if spec in PRESETS:
        cfg = preset(spec, vocab_size=vocab_size)
    elif p.is_file():
        if p.suffix == ".toml":
            from nanoseek.train.config import load_run_config

            cfg = load_run_config(p).model_config(vocab_size=vocab_size)
        else:
            from nanoseek.config import ModelConfig

            cfg = ModelConfig.from_json(p).replace(vocab_size=vocab_size)
    else:
        raise ConfigError(f"--student-config {spec!r} is neither a preset {sorted(PRESETS)}, a config file, "
                          "nor a model directory")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model


def write_traces(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
