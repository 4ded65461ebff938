"""Sampling: per-request parameters and the batched logits -> token step.

Greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2019) sampling over a batch whose rows may
each use different settings. Randomness comes only from each request's own `torch.Generator`, seeded from
`SamplingParams.seed`, so a request's tokens do not depend on which other requests share its batch.
Speculative decoding (engine.py) also needs the processed distribution itself, hence `probs()`, and the
acceptance rule over a whole batch, `verify_drafts()`.

Device rules (checked on the `meta` device by tests/test_device_guard.py): every tensor is made on the
logits' device, and nothing here reads a value back to the host. Draws use inverse-CDF sampling with one
uniform per sampled row from the request's generator, which lives on the CPU: its stream is the same
whatever device the model runs on (a seed reproduces across CPU and GPU, given the same distribution), and
the uniforms reach the device as one small non-blocking copy per step instead of a multinomial per row.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from nanoseek.errors import NanoseekError


class SamplingError(NanoseekError, ValueError):
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
    # Return the log-probability of each chosen token under the raw model distribution (temperature 1),
    # and that many of the most likely alternatives at each position (0-20).
    logprobs: bool = False
    top_logprobs: int = 0
    # OpenAI's penalties and bias, applied before sampling by nanoseek.infer.logits (its docstring has the
    # definitions): -2..2 each; logit_bias maps token ids to -100..100.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

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
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise SamplingError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= float(getattr(self, name)) <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or t < 0:
                raise SamplingError(f"logit_bias keys must be token ids, got {t!r}")
            if not -100.0 <= float(b) <= 100.0:
                raise SamplingError(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")
        return self

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        """A CPU generator, whatever the model's device: draw() moves its uniforms to the logits' device."""
        g = torch.Generator()
        # An unseeded request still gets its own generator: no shared global RNG state between requests.
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


class RowRandom:
    """One request's stream of U[0, 1) draws from its own CPU generator, drawn `block` values at a time.

    A CPU generator's torch.rand(n) yields the same values as n one-value draws in a row
    (tests/test_sampling.py checks it on the installed torch), so blocks change no sample; they replace a
    tensor op and a copy per row and token (the bulk of a sampled batch's per-step host work) with a list
    read. The generator runs ahead by up to one block: nothing else may draw from it.
    """

    __slots__ = ("generator", "block", "_buf", "_next")

    def __init__(self, generator: torch.Generator, block: int = 64):
        if block < 1:
            raise ValueError(f"RowRandom block must be >= 1, got {block}")
        self.generator, self.block = generator, block
        self._buf: list[float] = []
        self._next = 0

    def uniform(self) -> float:
        if self._next == len(self._buf):
            self._buf, self._next = torch.rand(self.block, generator=self.generator).tolist(), 0
        u = self._buf[self._next]
        self._next += 1
        return u


Randomness = torch.Generator | RowRandom | None  # a row's source of uniforms (None: the global CPU generator)


def device_tensor(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of host values on `device` without a host synchronisation: a plain torch.tensor(..., device=cuda)
    is a blocking copy that waits for every kernel queued before it."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor copied to `device` asynchronously: through pinned memory on CUDA (a copy from pageable
    memory may wait for the stream; the caching host allocator keeps the pinned buffer until the copy is done)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return t
    return (t.pin_memory() if dev.type == "cuda" else t).to(dev, non_blocking=True)


def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The sampling distribution of each row ([B, V] fp32 logits -> [B, V] probabilities).

    Greedy rows get a one-hot at the argmax; other rows get softmax(logits / T) restricted to the top-k
    tokens and to the smallest set whose mass reaches top_p.
    """
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    out = torch.empty_like(logits)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        idx = device_tensor(greedy, torch.long, dev)
        out[idx] = torch.nn.functional.one_hot(logits[idx].argmax(-1), V).float()
    rest = [i for i, p in enumerate(params) if not p.greedy]
    if not rest:
        return out
    idx = device_tensor(rest, torch.long, dev)
    temps = device_tensor([params[i].temperature for i in rest], torch.float32, dev)[:, None]
    x = logits[idx] / temps
    need_sort = any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rest)
    if need_sort:
        sorted_x, order = x.sort(-1, descending=True)
        ranks = torch.arange(V, device=dev)[None, :]
        top_k = device_tensor([params[i].top_k or V for i in rest], torch.long, dev)[:, None]
        sorted_x = sorted_x.masked_fill(ranks >= top_k, float("-inf"))
        p_sorted = sorted_x.softmax(-1)
        top_p = device_tensor([params[i].top_p for i in rest], torch.float32, dev)[:, None]
        # Keep a token when the mass strictly before it is below top_p (so the top token always stays).
        mass_before = p_sorted.cumsum(-1) - p_sorted
        sorted_x = sorted_x.masked_fill(mass_before >= top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    out[idx] = x.softmax(-1)
    return out


def row_uniforms(params: list[SamplingParams], generators: list[Randomness], device: torch.device | str
                 ) -> torch.Tensor:
    """[B] on `device`: one U[0, 1) draw from each sampled row's generator or RowRandom (None: the global
    CPU generator); greedy rows draw nothing and get 0."""
    u = [0.0 if sp.greedy else g.uniform() if isinstance(g, RowRandom) else float(torch.rand((), generator=g))
         for sp, g in zip(params, generators)]  # float32 values, exact through python floats
    return to_device(torch.tensor(u, dtype=torch.float32), device)


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row of p [B, V] (non-negative, not necessarily normalised) whose CDF interval holds
    u [B] * its mass: an exact draw from p when u is uniform. Zero-probability tokens are never chosen."""
    cdf = p.float().cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: keep it strictly below, inside the last non-empty interval.
    v = torch.minimum(u[:, None].float() * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True)[:, 0].clamp_max(p.shape[-1] - 1)


def draw(p: torch.Tensor, generators: list[Randomness], params: list[SamplingParams]) -> torch.Tensor:
    """One token per row from distributions p [B, V]; greedy rows take the argmax without using randomness."""
    if all(sp.greedy for sp in params):
        return p.argmax(-1)
    greedy = device_tensor([sp.greedy for sp in params], torch.bool, p.device)
    return torch.where(greedy, p.argmax(-1), inverse_cdf(p, row_uniforms(params, generators, p.device)))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Randomness]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (on the logits' device), each row with its own parameters and generator."""
    if all(p.greedy for p in params):
        return logits.argmax(-1)  # the common fast path: no softmax at all
    return draw(probs(logits, params), generators, params)


def verify_drafts(p0: torch.Tensor, p1: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                  params: list[SamplingParams], generators: list[Randomness]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for a batch: accept each row's draft token, and pick the token that follows.

    p0 [B, V]: the target distribution at the draft's position; p1 [B, V]: the one after it; q [B, V]: the
    draft distribution the draft was drawn from (any values for greedy rows); drafts [B]. Returns accepted
    [B] bool and token [B]: the token after the draft when accepted (from p1), else the replacement (from
    max(0, p0 - q) normalised; p0 when that is empty). Greedy rows accept iff the draft is p0's argmax, so
    their tokens equal plain greedy decoding; sampled rows accept with probability min(1, p0/q) at the draft
    (Leviathan et al. 2023), which keeps the output distribution p0. Each sampled row uses two uniforms.
    """
    top0 = p0.argmax(-1)
    greedy_accept = drafts == top0
    greedy_token = torch.where(greedy_accept, p1.argmax(-1), top0)
    if all(sp.greedy for sp in params):
        return greedy_accept, greedy_token
    rows = torch.arange(p0.shape[0], device=p0.device)
    u_accept = row_uniforms(params, generators, p0.device)
    u_draw = row_uniforms(params, generators, p0.device)
    accepted = u_accept * q[rows, drafts] < p0[rows, drafts]
    resid = (p0 - q).clamp_min(0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p0)
    token = inverse_cdf(torch.where(accepted[:, None], p1, resid), u_draw)
    greedy = device_tensor([sp.greedy for sp in params], torch.bool, p0.device)
    return torch.where(greedy, greedy_accept, accepted), torch.where(greedy, greedy_token, token)
