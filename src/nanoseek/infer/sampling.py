"""Sampling: per-request parameters and the batched logits -> token step.

Greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2019) sampling over a batch whose rows may
each use different settings. Randomness comes only from each request's own `torch.Generator`, seeded from
`SamplingParams.seed`, so a request's tokens do not depend on which other requests share its batch.
Speculative decoding (engine.py) also needs the processed distribution itself, hence `probs()`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """Invalid sampling parameters; the message names the offending field."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    # Generation ends after emitting any of these (the stop token is kept in the output, as in HF generate).
    stop_token_ids: list[int] = field(default_factory=list)
    # Return the log-probability of each chosen token under the raw model distribution (temperature 1).
    logprobs: bool = False

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        # An unseeded request still gets its own generator: no shared global RNG state between requests.
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The sampling distribution of each row ([B, V] fp32 logits -> [B, V] probabilities).

    Greedy rows get a one-hot at the argmax; other rows get softmax(logits / T) restricted to the top-k
    tokens and to the smallest set whose mass reaches top_p.
    """
    logits = logits.float()
    B, V = logits.shape
    out = torch.empty_like(logits)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        idx = torch.tensor(greedy)
        out[idx] = torch.nn.functional.one_hot(logits[idx].argmax(-1), V).float()
    rest = [i for i, p in enumerate(params) if not p.greedy]
    if not rest:
        return out
    idx = torch.tensor(rest)
    temps = torch.tensor([params[i].temperature for i in rest], dtype=torch.float32)[:, None]
    x = logits[idx] / temps
    need_sort = any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rest)
    if need_sort:
        sorted_x, order = x.sort(-1, descending=True)
        ranks = torch.arange(V)[None, :]
        top_k = torch.tensor([params[i].top_k or V for i in rest])[:, None]
        sorted_x = sorted_x.masked_fill(ranks >= top_k, float("-inf"))
        p_sorted = sorted_x.softmax(-1)
        top_p = torch.tensor([params[i].top_p for i in rest], dtype=torch.float32)[:, None]
        # Keep a token when the mass strictly before it is below top_p (so the top token always stays).
        mass_before = p_sorted.cumsum(-1) - p_sorted
        sorted_x = sorted_x.masked_fill(mass_before >= top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    out[idx] = x.softmax(-1)
    return out


def draw(p: torch.Tensor, generators: list[torch.Generator | None], params: list[SamplingParams]) -> torch.Tensor:
    """One token per row from distributions p [B, V]; greedy rows take the argmax without using randomness."""
    tokens = p.argmax(-1)
    for i, sp in enumerate(params):
        if not sp.greedy:
            tokens[i] = torch.multinomial(p[i], 1, generator=generators[i])[0]
    return tokens


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids, each row with its own parameters and generator."""
    if all(p.greedy for p in params):
        return logits.argmax(-1)  # the common fast path: no softmax at all
    return draw(probs(logits, params), generators, params)


def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))
