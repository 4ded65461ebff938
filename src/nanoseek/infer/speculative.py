"""The tensor part of an MTP speculative decode step (engine.py says how the step goes; DeepSeek-V3 section
2.2, and the speculative-sampling rule of Leviathan et al. 2023 / Chen et al. 2023 in
nanoseek.infer.sampling.verify_drafts), kept apart so that it can be checked on the `meta` device
(tests/test_device_guard.py): nothing here reads a value back to the host."""

from __future__ import annotations

import torch

from nanoseek.infer.logits import process, raw_logprobs
from nanoseek.infer.sampling import device_tensor, probs, verify_drafts


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row: logits [B, V], tokens [B] -> [B] fp32 (on the logits' device)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]


def speculative_tensors(logits_B2V: torch.Tensor, reqs: list):
    """The tensor part of a speculative step, from the two-token verification logits [B, 2, V]: accepted [B],
    the token that follows (or replaces) each draft [B], the raw log-probabilities [B, 2] of the tokens
    emitted at the two positions and the (ids, values) [B, 2, k] of their top alternatives (None unless a
    request asked for them). The logits are processed (bias, penalties, grammar; the second position as if
    the draft had been emitted) in place first. Nothing is read to the host (except to fill grammar masks)."""
    params = [r.params for r in reqs]
    dev = logits_B2V.device
    drafts = device_tensor([r.draft for r in reqs], torch.long, dev)
    raw = top = None
    if any(p.logprobs for p in params):
        k = max(p.top_logprobs for p in params)
        raw, top_ids, top_vals = raw_logprobs(logits_B2V, k)  # [B, 2, V]
        top = None if top_ids is None else (top_ids, top_vals)
    states = [r.logits_state for r in reqs]
    if any(s is not None for s in states):
        process(logits_B2V[:, 0], states)
        process(logits_B2V[:, 1], states, after=[r.draft if s is not None else None for r, s in zip(reqs, states)])
    if all(p.greedy for p in params):
        p0 = p1 = q = None
        accepted, token = verify_drafts(logits_B2V[:, 0], logits_B2V[:, 1], logits_B2V[:, 0], drafts, params,
                                        [r.generator for r in reqs])  # greedy rows only take argmaxes
    else:
        p0, p1 = probs(logits_B2V[:, 0], params), probs(logits_B2V[:, 1], params)
        q = torch.stack([p0[i] if r.draft_q is None else r.draft_q for i, r in enumerate(reqs)])
        accepted, token = verify_drafts(p0, p1, q, drafts, params, [r.generator for r in reqs])
    lp = None
    if raw is not None:
        first = torch.where(accepted, drafts, token)  # position 0 emits the draft, or its replacement
        lp = torch.stack([raw[:, 0].gather(-1, first[:, None])[:, 0], raw[:, 1].gather(-1, token[:, None])[:, 0]], 1)
    return accepted, token, lp, top
