"""GRPO as pure tensor functions: group-normalised advantages, the clipped-ratio objective, the KL estimator.

Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300, section 4.1; DeepSeek-R1, arXiv
2501.12948, section 2.2.1). For each question q, G outputs o_1..o_G are sampled from the old policy and
scored with rule-based rewards r_i. Then, per token t of output i:

    A_i        = (r_i - mean(r)) / std(r)                        (the same for every token of o_i)
    rho_i,t    = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | ...)
    KL_i,t     = pi_ref / pi - log(pi_ref / pi) - 1              (Schulman's k3 estimator: unbiased, >= 0)
    J_i,t      = min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta KL_i,t

and the loss is -J averaged over tokens. Nothing here knows about models or sampling: inputs are
per-token log-probabilities [B, T] (B = questions x G, rows grouped consecutively), a 0/1 completion mask
[B, T] and rewards [B]; nanoseek.rl.trainer computes those.

Choices beyond the paper's formula, all stated:
* std is the population standard deviation of the group (so a group's advantages have unit variance),
  and a group whose rewards are all equal gets advantage 0 for every member (no signal, no NaN) rather
  than (r - mean) / eps.
* Aggregation: "token" (default) averages over all completion tokens of the batch (DAPO, arXiv
  2503.14476), which removes the length bias of the paper's per-sequence 1/|o_i| average; "sequence"
  is the paper's formula: mean over outputs of the mean over that output's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token", "sequence")


@dataclass(frozen=True)
class LossStats:
    """Detached diagnostics of one loss evaluation (python floats)."""

    loss: float
    kl: float             # mean KL estimate per completion token
    clip_fraction: float  # share of completion tokens whose clipped term is the active one (zero gradient)
    ratio_mean: float     # mean rho over completion tokens (1.0 on-policy)
    tokens: int


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / std of its group; 0 for the whole group when its std <= eps.

    `rewards` [B] with B = n_groups * group_size, each group's G rewards consecutive. Returns [B] float32.
    """
    r = rewards.float().flatten()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards cannot be split into groups of {group_size}")
    r_NG = r.view(-1, group_size)
    mean_N1 = r_NG.mean(dim=1, keepdim=True)
    std_N1 = r_NG.std(dim=1, unbiased=False, keepdim=True)
    adv_NG = torch.where(std_N1 > eps, (r_NG - mean_N1) / std_N1.clamp_min(eps), torch.zeros_like(r_NG))
    return adv_NG.flatten()


def zero_variance_fraction(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> float:
    """Share of groups whose rewards are all equal: they contribute no policy gradient (with (r - mean)/std
    advantages every advantage is 0; truncation at the length limit is the usual cause)."""
    r_NG = rewards.float().flatten().view(-1, group_size)
    return float((r_NG.std(dim=1, unbiased=False) <= eps).float().mean())


def kl_estimator(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """pi_ref/pi - log(pi_ref/pi) - 1 per token, from log-probabilities; >= 0, and 0 iff they agree."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits [B, T, V], targets [B, T] -> [B, T] float32.

    Targets outside [0, V) (e.g. -100 padding) get 0 instead of an index error; mask them afterwards.
    """
    V = logits.shape[-1]
    safe = targets.clamp(0, V - 1)
    # Sum of the chosen logit minus logsumexp is log_softmax without materialising a second [B,T,V] tensor.
    logits = logits.float()
    chosen = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = chosen - torch.logsumexp(logits, dim=-1)
    return torch.where((targets >= 0) & (targets < V), out, torch.zeros_like(out))


@dataclass(frozen=True)
class Whole:
    """Counts of the whole batch that a part of it (one micro-batch of rows) is averaged over, so that the
    parts' losses and statistics add up to the whole's: its completion tokens, and its sequences that have
    at least one."""

    tokens: float
    sequences: float

    @classmethod
    def of(cls, mask: torch.Tensor) -> "Whole":
        m = mask.float()
        return cls(float(m.sum()), float((m.sum(dim=1) > 0).sum()))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token", whole: Whole | None = None
              ) -> torch.Tensor:
    """Average a [B, T] per-token quantity over the mask: over all tokens ("token") or per sequence first.

    With `whole`, these rows are one part of a larger batch: the sum is divided by the whole batch's token
    (or sequence) count instead of this part's, so that summing the parts gives the whole's average.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    m = mask.to(per_token.dtype)
    if how == "token":
        n = m.sum().clamp_min(1.0) if whole is None else max(whole.tokens, 1.0)
        return (per_token * m).sum() / n
    per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    has_tokens = (m.sum(dim=1) > 0).to(per_token.dtype)
    n = has_tokens.sum().clamp_min(1.0) if whole is None else max(whole.sequences, 1.0)
    return (per_seq * has_tokens).sum() / n


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.001,
              aggregation: str = "token", whole: Whole | None = None) -> tuple[torch.Tensor, LossStats]:
    """The GRPO loss (to minimise) and its diagnostics.

    logp [B, T] carries the gradient; old_logp [B, T] (the sampling policy) and ref_logp [B, T] (the frozen
    reference, None when beta is 0) are treated as constants; advantages [B]; mask [B, T] is 1 on
    completion tokens. With old_logp == logp.detach() (one update per rollout) rho is 1 and clipping is
    inactive, but the gradient is still A * grad log pi, as in the paper's single-update case. `whole`: these
    rows are one part of a batch (see aggregate); the loss and statistics are then this part's share.
    """
    loss, diag = grpo_loss_tensors(logp, old_logp, advantages, mask, ref_logp, clip_eps, beta, aggregation, whole)
    stats = LossStats(loss=float(loss.detach()), kl=float(diag["kl"]), clip_fraction=float(diag["clip_fraction"]),
                      ratio_mean=float(diag["ratio_mean"]), tokens=int(diag["tokens"]))
    return loss, stats


def grpo_loss_tensors(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.001,
                      aggregation: str = "token", whole: Whole | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss without reading anything back to the host: the loss and its diagnostics as 0-d tensors on
    logp's device (keys kl, clip_fraction, ratio_mean, tokens)."""
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp, the reference policy's log-probabilities")
    mask = mask.to(logp.dtype)
    A_B1 = advantages.to(logp.dtype).view(-1, 1)
    ratio = torch.exp(logp - old_logp.detach())
    surr = ratio * A_B1
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * A_B1
    objective = torch.minimum(surr, surr_clipped)
    if ref_logp is not None:
        kl = kl_estimator(logp, ref_logp.detach())
        if beta > 0:
            objective = objective - beta * kl
    else:
        kl = torch.zeros_like(logp)
    loss = -aggregate(objective, mask, aggregation, whole)
    with torch.no_grad():
        n = mask.sum().clamp_min(1.0) if whole is None else max(whole.tokens, 1.0)
        clipped = ((ratio > 1 + clip_eps) & (A_B1 > 0)) | ((ratio < 1 - clip_eps) & (A_B1 < 0))
        diag = {"kl": (kl * mask).sum() / n, "clip_fraction": (clipped.to(mask.dtype) * mask).sum() / n,
                "ratio_mean": (ratio * mask).sum() / n, "tokens": mask.sum()}
    return loss, diag


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, T], targets [B, T], mask [B, T]) for prompt + completion rows.

    targets[t] = ids[t + 1]; mask is 1 where the target is a completion token, so position t scores the
    log-probability of completion token t + 1 given everything before it.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T))
    for i, (p, r) in enumerate(zip(prompts, rows)):
        n = len(r) - 1
        ids[i, :n] = torch.tensor(r[:-1])
        targets[i, :n] = torch.tensor(r[1:])
        mask[i, len(p) - 1:n] = 1.0
    return ids, targets, mask



def length_buckets(lengths: list[int], max_buckets: int = 4, min_rows: int = 8, min_saving: float = 0.1
                   ) -> list[list[int]]:
    """Rows grouped into at most `max_buckets` micro-batches of similar length, each padded only to its own
    longest row: the row indices of each bucket (sorted by length).

    A [B, T] batch padded to its longest row computes B * max(length) positions; buckets of consecutive
    sorted lengths compute sum(rows * longest) instead. The split minimises that (an exact dynamic
    programme over the sorted lengths) with at least `min_rows` rows per bucket, so that the GEMMs stay
    large, charging each extra bucket 2% of the padded batch for its extra forward pass; it is used only
    when it saves at least `min_saving` of the padded positions, otherwise one bucket holds every row in
    its original order.
    """
    B = len(lengths)
    whole = [list(range(B))]
    if B == 0 or max_buckets <= 1 or B < 2 * min_rows:
        return whole
    order = sorted(range(B), key=lambda i: lengths[i])
    ln = [lengths[i] for i in order]
    inf = float("inf")
    # cost[k][j]: least positions for the first j sorted rows in k buckets; cut[k][j]: where the last starts.
    cost = [[inf] * (B + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (B + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(k * min_rows, B + 1):
            for i in range((k - 1) * min_rows, j - min_rows + 1):
                c = cost[k - 1][i] + (j - i) * ln[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    per_bucket = 0.02 * B * ln[-1]
    k = min(range(1, max_buckets + 1), key=lambda k: (cost[k][B] + (k - 1) * per_bucket, k))
    if cost[k][B] > (1 - min_saving) * B * ln[-1]:
        return whole
    buckets, j = [], B
    for kk in range(k, 0, -1):
        i = cut[kk][j]
        buckets.append(order[i:j])
        j = i
    return buckets[::-1]
