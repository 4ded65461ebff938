"""What each part of the model holds and costs per token (weights, FLOPs, saved activations), and how
the decoder layers are split into pipeline stages. Formulas: see the nanoseek.plan docstring."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from nanoseek.accounting import attention_flops_per_token, block_params, mtp_block_is_moe
from nanoseek.config import ModelConfig
from nanoseek.plan.specs import RECOMPUTE, V_SHAPED, PlanError, Precision


# ----------------------------------------------------------------------------- what each block holds
def activation_elements(cfg: ModelConfig, part: str, recompute: str) -> list[tuple[str, int, str]]:
    """Tensors one token leaves saved for backward in one block `part` ('attention', 'moe', 'dense'):
    (what, elements, kind), kind one of 'act' (act_bytes), 'cache' (a linear layer's input),
    'attn_out' (the attention output) or 'f32'."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if recompute == "full":  # only the block's input survives; the block runs again in backward
        return [("block input", D, "act")]
    none = recompute == "none"
    if part == "attention":
        q, kv, r = cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        out = [("input_layernorm input", D, "act"), ("q_a_proj output", q, "act"),
               ("kv_a_proj output (latent + rope key)", kv + r, "act"),
               ("attention output (o_proj input)", H * cfg.v_head_dim, "attn_out"),
               ("softmax log-sum-exp", H, "f32")]
        if none:  # selective recomputes the norms and the up-projections (q, k, v) instead
            out += [("normed input (q_a/kv_a input)", D, "cache"), ("normed q latent (q_b input)", q, "cache"),
                    ("normed kv latent (kv_b input)", kv, "cache"),
                    ("q, k after rope; v", H * (2 * cfg.qk_head_dim + cfg.v_head_dim), "act")]
        return out
    if part == "dense":
        F = cfg.intermediate_size
        out = [("post_attention_layernorm input", D, "act"), ("SwiGLU input (gate_up output)", 2 * F, "cache")]
        if none:
            out += [("normed input (gate_up input)", D, "cache"), ("SwiGLU output (down input)", F, "cache")]
        return out
    K, F, Fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    out = [("post_attention_layernorm input", D, "act"), ("router scores", cfg.n_routed_experts, "f32"),
           ("gate weights", K, "f32"), ("dispatched expert inputs (top_k copies)", K * D, "cache"),
           ("expert SwiGLU inputs", K * 2 * F, "cache"), ("shared-expert SwiGLU input", 2 * Fs, "cache")]
    if none:
        # Selective keeps neither: SwiGLU outputs are recomputed from their inputs, and the gate-weight
        # gradient <g, y_e> equals <W_down^T g, SwiGLU output>, so the expert outputs need not be kept.
        out += [("normed input (router/expert input)", D, "cache"), ("expert SwiGLU outputs", K * F, "cache"),
                ("shared-expert SwiGLU output", Fs, "cache"), ("expert outputs (for the gate gradient)", K * D, "act")]
    return out


def _bytes(elements: list[tuple[str, int, str]], prec: Precision) -> float:
    size = {"act": prec.act_bytes, "cache": prec.cache_bytes, "attn_out": prec.attn_out_bytes, "f32": 4.0}
    return sum(n * size[kind] for _, n, kind in elements)


@dataclass
class Piece:
    """Something a stage holds: a decoder layer, the embedding, the head, an MTP module."""

    name: str
    dense_params: int          # replicated over the stage's ep x dp GPUs
    expert_params: int         # all routed experts; each GPU holds 1/ep of them
    fwd_flops: float           # per token
    recompute_flops: dict = field(default_factory=dict)  # extra forward FLOPs per token, by recompute mode
    act: dict = field(default_factory=dict)              # saved bytes per token, by recompute mode
    moe: bool = False
    layer: bool = False


def _block_piece(cfg: ModelConfig, name: str, moe: bool, seq_len: int, prec: Precision) -> Piece:
    bp = block_params(cfg, moe)
    attn_fwd = attention_flops_per_token(cfg, seq_len, num_layers=1) / 3  # training = 3 x forward
    fwd = 2.0 * bp["active_matmul"] + attn_fwd
    H = cfg.num_attention_heads
    q_up = H * cfg.qk_head_dim * (cfg.q_lora_rank or cfg.hidden_size)
    kv_up = H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank
    part = "moe" if moe else "dense"
    act = {m: _bytes(activation_elements(cfg, "attention", m) + activation_elements(cfg, part, m), prec)
           for m in RECOMPUTE}
    act["full"] = _bytes(activation_elements(cfg, part, "full"), prec)  # one input per block, not two
    return Piece(name, bp["total"] - bp["routed"], bp["routed"], fwd,
                 {"none": 0.0, "selective": 2.0 * (q_up + kv_up), "full": fwd}, act, moe=moe, layer=True)


def pieces(cfg: ModelConfig, seq_len: int, prec: Precision) -> tuple[list[Piece], Piece, Piece, list[Piece]]:
    """(decoder layers, embedding, final norm + head, MTP modules) with their parameters, FLOPs, activations."""
    D, V = cfg.hidden_size, cfg.vocab_size
    kinds = {moe: _block_piece(cfg, "", moe, seq_len, prec) for moe in set(cfg.is_moe_layer)}  # dense, MoE
    layers = [replace(kinds[moe], name=f"layer {i}") for i, moe in enumerate(cfg.is_moe_layer)]
    zero = {m: 0.0 for m in RECOMPUTE}
    emb = Piece("embedding", V * D, 0, 0.0, dict(zero), dict(zero))
    head_act = {m: D * prec.act_bytes + (D * prec.cache_bytes if m == "none" else 0.0) for m in RECOMPUTE}
    head = Piece("final norm + head", V * D * (not cfg.tie_word_embeddings) + D, 0, 2.0 * V * D, dict(zero), head_act)
    mtp = []
    for i in range(cfg.num_nextn_predict_layers):
        b = _block_piece(cfg, f"MTP {i}", mtp_block_is_moe(cfg, i), seq_len, prec)
        own = 3 * D + 2 * D * D  # enorm, hnorm, shared_head.norm; eh_proj
        extra_act = {m: 2 * D * prec.act_bytes + (2 * D * prec.cache_bytes if m == "none" else 0.0)
                     for m in RECOMPUTE}
        mtp.append(Piece(b.name, b.dense_params + own, b.expert_params,
                         b.fwd_flops + 2.0 * (2 * D * D + V * D),  # eh_proj and its pass through the shared head
                         {m: b.recompute_flops[m] + (2.0 * 2 * D * D if m == "full" else 0.0) for m in RECOMPUTE},
                         {m: b.act[m] + extra_act[m] + head_act[m] for m in RECOMPUTE}, moe=b.moe))
    return layers, emb, head, mtp


# ----------------------------------------------------------------------------- stages and ranks
def chunks_per_rank(schedule: str | None, virtual_stages: int) -> int:
    if schedule in V_SHAPED:
        return 2
    return virtual_stages if schedule == "Interleaved1F1B" else 1


def stage_rank(s: int, pp: int, schedule: str | None) -> int:
    """The pipeline rank that runs stage s."""
    if schedule in V_SHAPED:
        return s if s < pp else 2 * pp - 1 - s
    return s % pp


def split_layers(layer_cost: list[float], extra_cost: list[float], ranks: list[int], num_ranks: int,
                 may_be_empty: list[bool] | None = None) -> list[int]:
    """Decoder layers per stage (in order) that minimise the busiest rank's cost (see _split_layers)."""
    return list(_split_layers(tuple(layer_cost), tuple(extra_cost), tuple(ranks), num_ranks,
                              None if may_be_empty is None else tuple(may_be_empty)))


@functools.lru_cache(maxsize=4096)  # a --search asks again for the same split under many layouts
def _split_layers(layer_cost: tuple, extra_cost: tuple, ranks: tuple, num_ranks: int,
                  may_be_empty: tuple | None) -> tuple[int, ...]:
    """Decoder layers per stage (in order) that minimise the busiest rank's cost.

    `extra_cost[s]` is what stage s holds besides layers (embedding, head, MTP), `ranks[s]` its rank.
    Stages not marked `may_be_empty` (default: those without extra cost) get at least one layer. For a
    cap T (bisected), fill the stages in order, each taking layers while its rank stays within T with
    room kept for its later stages' one layer, and while the later stages can still get theirs."""
    S, L = len(ranks), len(layer_cost)
    needs = [not e for e in may_be_empty] if may_be_empty is not None else [c == 0 for c in extra_cost]
    need_after = [sum(needs[s + 1:]) for s in range(S)]
    if L < sum(needs):
        raise PlanError(f"{S} pipeline stages need at least {sum(needs)} decoder layers, the model has {L}")

    cmax = max(layer_cost, default=0.0)

    def fill(cap: float) -> list[int] | None:
        load = [0.0] * num_ranks
        forced = [0] * num_ranks  # stages of each rank still to come that must get a layer
        for s in range(S):
            load[ranks[s]] += extra_cost[s]
            forced[ranks[s]] += needs[s]
        counts, i = [], 0
        for s in range(S):
            r, n, last, must = ranks[s], 0, s == S - 1, needs[s]
            forced[r] -= must
            while i < L - need_after[s] and (last or n < must or load[r] + layer_cost[i] + forced[r] * cmax <= cap):
                load[r] += layer_cost[i]
                i, n = i + 1, n + 1
            counts.append(n)
        return counts if i == L and max(load) <= cap * (1 + 1e-12) else None

    lo, hi = 0.0, sum(layer_cost) + sum(extra_cost)
    best = fill(hi)
    for _ in range(60):
        if hi - lo <= 1e-12 * hi:  # as close as fill's own tolerance tells caps apart
            break
        mid = (lo + hi) / 2
        plan = fill(mid)
        if plan is None:
            lo = mid
        else:
            hi, best = mid, plan
    assert best is not None
    return tuple(best)

