"""Evaluation on a task's held-out split: pass@1 (mean over k samples) and cons@k (majority vote).

DeepSeek-R1 (arXiv 2501.12948, section 3, "Evaluation Setup") samples k responses per question at
temperature 0.6 and top-p 0.95 and reports pass@1 = (1/k) sum_i p_i, the mean correctness over the k
samples, which is far less noisy than one greedy answer; cons@k is the accuracy of the majority answer of
the k samples. Those are the defaults here. All n*k completions go through the inference engine in one
batched call (nanoseek.infer.Engine.generate_batch).

Majority vote: answers are compared after normalisation (numbers by exact value, so "12" and "12.0"
agree; other text with whitespace collapsed); samples without an extractable answer do not vote; a tie
goes to the answer that appeared first. The vote winner is then checked by the task's checker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch

from nanoseek.data.chat import parse_completion, render_prompt
from nanoseek.data.tasks import Example, Task, check_answer
from nanoseek.data.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- metrics on samples
def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of that problem's k samples that are correct."""
    if not correct:
        return 0.0
    for i, row in enumerate(correct):
        if not row:
            raise ValueError(f"problem {i} has no samples")
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def answer_key(answer: str) -> Fraction | str:
    """What two answers must share to count as the same vote."""
    text = " ".join(answer.split())
    try:
        return Fraction(text.replace(",", "").rstrip("."))
    except (ValueError, ZeroDivisionError):
        return text


def majority_answer(answers: Sequence[str]) -> str | None:
    """The most common non-empty answer (first seen wins a tie), or None when no sample has one."""
    votes = [a for a in answers if a and a.strip()]
    if not votes:
        return None
    counts = Counter(answer_key(a) for a in votes)
    best = max(counts.values())
    return next(a for a in votes if counts[answer_key(a)] == best)


def cons_at_k(answers: Sequence[Sequence[str]], examples: Sequence[Example]) -> float:
    """Fraction of problems whose majority answer passes the checker."""
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answer lists for {len(examples)} examples")
    if not examples:
        return 0.0
    hits = 0
    for ans, ex in zip(answers, examples):
        top = majority_answer(ans)
        hits += top is not None and check_answer(top, ex)
    return hits / len(examples)


# ----------------------------------------------------------------------------- running a model
@dataclass
class EvalResult:
    task: str
    n: int
    k: int
    pass_at_1: float
    cons_at_k: float
    format_rate: float          # share of samples that parse strictly (nanoseek.data.chat.parse_completion)
    mean_length: float          # completion tokens per sample
    truncated: float            # share of samples cut at max_new_tokens
    temperature: float
    top_p: float
    samples: list[dict] = field(default_factory=list)  # per problem: prompt, reference, answers, correct

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def sample_completions(model: torch.nn.Module, tok: Tokenizer, prompts: Sequence[str], k: int, max_new_tokens: int,
                       temperature: float, top_p: float, seed: int, max_batch_size: int = 128, engine=None,
                       progress: bool = False):
    """k completions per prompt through the batched engine; returns (texts [n][k], token counts [n][k],
    truncated flags [n][k]). Sample j of prompt i uses seed + i * k + j, so results do not depend on batching.

    All requests go to the engine in one call, or with `progress` in chunks of its slot count (one
    progress-bar tick per chunk; every chunk still fills the whole batch)."""
    from nanoseek.infer import Engine, SamplingParams

    ids = [render_prompt(p, tok) for p in prompts]
    flat = [p for p in ids for _ in range(k)]
    if not flat:
        return [], [], []
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                             stop_token_ids=[tok.eos_id]) for i in range(len(flat))]
    if engine is None:
        max_len = min(max(len(p) for p in flat) + max_new_tokens, model.config.max_position_embeddings)
        engine = Engine(model, max_batch_size=min(len(flat), max_batch_size), max_len=max_len)
    was_training = model.training
    model.eval()
    try:
        if progress:
            from tqdm.auto import tqdm

            step = engine.max_batch_size
            outs = []
            with tqdm(total=len(flat), desc="eval", unit="sample", dynamic_ncols=True) as bar:
                for i in range(0, len(flat), step):
                    outs += engine.generate_batch(flat[i:i + step], params[i:i + step])
                    bar.update(len(flat[i:i + step]))
        else:
            outs = engine.generate_batch(flat, params)
    finally:
        model.train(was_training)
    texts = [tok.decode(c.token_ids) for c in outs]
    lens = [len(c.token_ids) for c in outs]
    trunc = [c.finish_reason == "length" for c in outs]
    n = len(prompts)
    return ([texts[i * k:(i + 1) * k] for i in range(n)], [lens[i * k:(i + 1) * k] for i in range(n)],
            [trunc[i * k:(i + 1) * k] for i in range(n)])


def evaluate(model: torch.nn.Module, tok: Tokenizer, task: Task, n: int = 200, k: int = 4, difficulty: int = 1,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 128, seed: int = 0,
             max_batch_size: int = 128, split: str = "test", progress: bool = False) -> EvalResult:
    """pass@1 over k samples and cons@k on `n` problems of the held-out split."""
    if k < 1 or n < 1:
        raise ValueError(f"n and k must be >= 1, got n={n}, k={k}")
    examples = task.examples(split, n, seed=seed, difficulty=difficulty)
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} problems at difficulty {difficulty}")
    texts, lens, trunc = sample_completions(model, tok, [ex.prompt for ex in examples], k, max_new_tokens,
                                            temperature, top_p, seed=seed * 1_000_003, max_batch_size=max_batch_size,
                                            progress=progress)
    correct, answers, samples, well_formed = [], [], [], 0
    for ex, row in zip(examples, texts):
        parsed = [parse_completion(t) for t in row]
        ans = [p.answer for p in parsed]
        ok = [bool(a) and check_answer(a, ex) for a in ans]
        well_formed += sum(p.well_formed for p in parsed)
        correct.append(ok)
        answers.append(ans)
        samples.append({"prompt": ex.prompt, "reference": ex.answer, "answers": ans, "correct": ok,
                        "completion": row[0]})
    total = len(examples) * k
    return EvalResult(task=task.name, n=len(examples), k=k, pass_at_1=pass_at_1(correct),
                      cons_at_k=cons_at_k(answers, examples), format_rate=well_formed / total,
                      mean_length=sum(map(sum, lens)) / total, truncated=sum(map(sum, trunc)) / total,
                      temperature=temperature, top_p=top_p, samples=samples)
