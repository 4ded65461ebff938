"""Per-request logits processing between the model and the sampler: `logit_bias`, presence and frequency
penalties, and grammar masks (structured output, forced tool calls: nanoseek.infer.grammar).

The OpenAI definitions: `logit_bias` adds a fixed value (-100..100) to chosen token ids; with c[t] the
number of times token t was generated so far (the prompt does not count), the penalties subtract
`frequency_penalty * c[t] + presence_penalty * (c[t] > 0)`. A grammar row keeps only the tokens that can
continue the constrained output (every other logit becomes -inf; EOS only once the output is complete).

Everything works on a batch whose rows each have their own settings; rows without any are untouched, and a
batch with none costs nothing. The per-request state (`LogitsState`: the bias as device tensors, the token
counts, the grammar matcher) lives on the engine's Request. Speculative decoding also needs the logits at
the position after a drafted token: `process(..., after=drafts)` treats each row's draft as already
emitted (counts + 1, the matcher advanced by it and rolled back) without changing any state.

Closing in time: a grammar row that nears its max_tokens would end as cut-off JSON (a weak or random
model can write one string forever). In its last CLOSE_RESERVE tokens the row is steered to finish: while
it still reasons, towards the trigger (`</think>`); then, among the tokens the grammar allows, towards EOS,
then `"` (ends a string; at a value position starts the shortest one), then `}` / `]`, then `0` (the
shortest number). A schema's own bounds still hold (the mask comes after); a deep required structure may
still need more tokens than the reserve.

Log-probabilities returned to clients are those of the raw model distribution (before any of this), as
vLLM reports them by default: `raw_logprobs` computes them and their top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.infer.sampling import SamplingParams, device_tensor


CLOSE_RESERVE = 16  # tokens before max_tokens at which a grammar row is steered to finish


@dataclass
class LogitsState:
    """What one request's processing needs between steps (engine-private, made at submit time)."""

    params: SamplingParams
    matcher: object | None = None  # nanoseek.infer.grammar.Matcher (imported lazily: llguidance is optional)
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # [V] float32: how often each token was generated (penalties only)
    emitted: int = 0
    closers: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, bias) that finish the JSON soonest
    openers: tuple[torch.Tensor, torch.Tensor] | None = None  # (trigger ids, bias): end the reasoning

    @classmethod
    def make(cls, params: SamplingParams, vocab_size: int, device: torch.device, matcher=None) -> "LogitsState":
        st = cls(params, matcher)
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            st.bias_ids = device_tensor(ids, torch.long, device)
            st.bias_values = device_tensor([float(params.logit_bias[i]) for i in ids], torch.float32, device)
        if params.penalized:
            st.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if matcher is not None:
            gt = matcher.tokenizer
            pairs = [(e, 4e4) for e in gt.eos_token_ids]
            pairs += [(i, b) for c, b in (('"', 3e4), ("}", 2e4), ("]", 2e4), ("0", 1e4))
                      if (i := gt.token_id(c)) is not None]
            st.closers = (device_tensor([i for i, _ in pairs], torch.long, device),
                          device_tensor([b for _, b in pairs], torch.float32, device))
            if matcher.trigger_ids:
                ids = sorted(matcher.trigger_ids)
                st.openers = (device_tensor(ids, torch.long, device), device_tensor([4e4] * len(ids), torch.float32, device))
        return st

    def steering(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The close-out bias for this step, or None (see the module docstring)."""
        m = self.matcher
        if m is None or m.error is not None:
            return None
        reserve = min(CLOSE_RESERVE, max(1, self.params.max_tokens // 2))
        if self.params.max_tokens - self.emitted > reserve:
            return None
        return self.closers if m.active else self.openers

    @property
    def active(self) -> bool:
        return self.matcher is not None or self.bias_ids is not None or self.counts is not None

    def observe(self, tokens: Sequence[int]) -> bool:
        """Record emitted tokens; False when the grammar refuses one (the request must then end)."""
        self.emitted += len(tokens)
        if self.counts is not None and tokens:
            idx = device_tensor(list(tokens), torch.long, self.counts.device)
            self.counts.index_add_(0, idx, torch.ones(len(tokens), device=self.counts.device))
        if self.matcher is not None:
            for t in tokens:
                if not self.matcher.advance(t):
                    return False
        return True


def process(logits: torch.Tensor, states: Sequence[LogitsState | None],
            after: Sequence[int] | None = None) -> torch.Tensor:
    """Apply bias, penalties and grammar masks of every row to logits [B, V] in place (and return it).

    `after`: per row, a token to treat as already emitted (the speculative draft), or None for none.
    """
    rows = [i for i, s in enumerate(states) if s is not None and s.active]
    if not rows:
        return logits
    dev = logits.device
    biases = [(i, (states[i].bias_ids, states[i].bias_values)) for i in rows if states[i].bias_ids is not None]
    biases += [(i, st) for i in rows if (st := states[i].steering()) is not None]
    if biases:
        r = torch.cat([torch.full_like(ids, i) for i, (ids, _) in biases])
        c = torch.cat([ids for _, (ids, _) in biases])
        v = torch.cat([vals for _, (_, vals) in biases]).to(logits.dtype)
        logits.index_put_((r, c), v, accumulate=True)
    penalized = [i for i in rows if states[i].counts is not None]
    if penalized:
        counts = torch.stack([states[i].counts for i in penalized])  # [R, V]
        if after is not None:
            extra = [(k, after[i]) for k, i in enumerate(penalized) if after[i] is not None]
            if extra:
                counts[device_tensor([k for k, _ in extra], torch.long, dev),
                       device_tensor([t for _, t in extra], torch.long, dev)] += 1
        freq = device_tensor([states[i].params.frequency_penalty for i in penalized], torch.float32, dev)[:, None]
        pres = device_tensor([states[i].params.presence_penalty for i in penalized], torch.float32, dev)[:, None]
        idx = device_tensor(penalized, torch.long, dev)
        logits[idx] -= (freq * counts + pres * (counts > 0).float()).to(logits.dtype)
    constrained = [i for i in rows if states[i].matcher is not None]
    if constrained:
        _mask(logits, states, constrained, after)
    return logits


def _mask(logits: torch.Tensor, states: Sequence[LogitsState | None], rows: list[int],
          after: Sequence[int] | None) -> None:
    from nanoseek.infer.grammar import allocate_bitmask, apply_masks, fill_masks

    matchers = [None] * logits.shape[0]
    advanced = []
    for i in rows:
        m = states[i].matcher
        if after is not None and after[i] is not None:
            # The mask after the draft: advance by it if the grammar allows it (else the draft is rejected
            # anyway, since the mask at its own position gave it -inf, and this row's mask does not matter).
            if m.valid_prefix([after[i]]) != 1:
                continue
            m.advance(after[i])
            advanced.append(m)
        matchers[i] = m
    try:
        bitmask = allocate_bitmask(logits.shape[0], logits.shape[1])
        filled = fill_masks(matchers, bitmask)
    finally:
        for m in advanced:
            m.rollback(1)
    apply_masks(logits, bitmask, filled)


def raw_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log_softmax [B, V] fp32, top-k ids [B, k], top-k log-probs [B, k]) of raw logits; no top-k when k is 0."""
    lp = torch.log_softmax(logits.float(), -1)
    if k <= 0:
        return lp, None, None
    vals, ids = lp.topk(min(k, lp.shape[-1]), -1)
    return lp, ids, vals
