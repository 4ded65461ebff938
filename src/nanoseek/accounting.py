"""Parameter counts, KV-cache bytes and training FLOPs per token of a ModelConfig, and `nanoseek params`.

Pure arithmetic on `nanoseek.config.ModelConfig`, shape by shape as the Hugging Face `deepseek_v3`
checkpoint lays the weights out (the names nanoseek.hf maps), so the counts equal what a loader sees:

  per layer      input_layernorm [D], post_attention_layernorm [D]
  MLA            q_a_proj [q_lora, D], q_a_layernorm [q_lora], q_b_proj [H*qk_head_dim, q_lora]
                 (or q_proj [H*qk_head_dim, D] when q_lora_rank is null, as in V2-Lite),
                 kv_a_proj_with_mqa [kv_lora + rope, D], kv_a_layernorm [kv_lora],
                 kv_b_proj [H*(nope + v), kv_lora], o_proj [D, H*v]
  dense MLP      gate/up/down: 3 * D * intermediate_size           (layers < first_k_dense_replace)
  MoE            router gate.weight [E, D] (+ e_score_correction_bias [E] with noaux_tc routing),
                 E routed experts and n_shared shared experts of 3 * D * moe_intermediate_size each
  model          embed_tokens [V, D], final norm [D], lm_head [V, D] (not counted twice when tied)
  MTP module     enorm [D], hnorm [D], eh_proj [D, 2D], one full decoder block (a MoE layer in V3),
                 shared_head.norm [D]; its embed_tokens and shared_head.head are copies of the main
                 model's (V3 report section 2.2: shared embedding and output head)
  V3.2 indexer   (deepseek_v32, in every layer and the MTP block) self_attn.indexer.wq_b [I*E, q_lora],
                 wk [E, D], k_norm weight + bias [E] (a LayerNorm), weights_proj [I, D]
                 (I = index_n_heads, E = index_head_dim): 13,959,424 per layer for DeepSeek-V3.2

For the `deepseek-v3` preset: 671.03B total, 37.55B active, 11.61B own MTP parameters (DeepSeek's weight
notes, https://github.com/deepseek-ai/DeepSeek-V3/blob/main/README_WEIGHTS.md, round this to "11.5B": the
decoder block alone is 11.51B, eh_proj adds 0.10B; with its embedding and head copies 13.46B, "14B"
there), and 61 x (512 + 64) x 2 = 70,272 KV-cache bytes per token.
`deepseek-v3.2` adds 61 x 13,959,424 = 0.85B indexer parameters (671.88B total) and 61 x 128 x 2 = 15,616
bytes of indexer keys per token in BF16 (DeepSeek's kernels keep them in FP8 with one fp32 scale per 128
values: 61 x 132 = 8,052 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

from nanoseek.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one config. `active_params` counts every non-routed-expert parameter plus
    top_k / n_routed of the routed ones; the `*_matmul_*` fields are what the 6N FLOP rule multiplies."""

    total_params: int            # main model (embedding, layers, final norm, lm_head), no MTP
    active_params: int           # per token, main model
    mtp_params: int              # the MTP modules' own parameters (all modules together)
    mtp_params_with_copies: int  # plus each module's copy of embedding and head, as stored on disk
    routed_expert_params: int    # main model, all routed experts of all MoE layers
    embedding_params: int
    lm_head_params: int          # 0 when tie_word_embeddings
    attention_params: int        # main model MLA weights, norms inside MLA included
    dense_mlp_params: int
    shared_expert_params: int
    router_params: int           # gate weights and correction biases
    norm_params: int             # every norm weight of the main model (MLA's two RMSNorms and V3.2's k_norm
                                 # LayerNorm, weight and bias, included)
    active_matmul_params: int    # active weights used in a matmul per token: no embedding lookup, norms
                                 # or biases; lm_head included (its matmul runs even when tied)
    mtp_active_matmul_params: int  # same for the MTP modules, each re-running the shared head
    indexer_params: int = 0      # main model, V3.2 lightning indexers (inside attention_params; 0 for V3)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- per-part shapes
def _attention_parts(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, norm weights) of one MLA block."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q_out = H * cfg.qk_head_dim
    if cfg.q_lora_rank is None:
        q_mm, q_norm = q_out * D, 0                                             # q_proj
    else:
        q_mm = cfg.q_lora_rank * D + q_out * cfg.q_lora_rank                    # q_a_proj, q_b_proj
        q_norm = cfg.q_lora_rank                                                # q_a_layernorm
    kv_mm = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * D                       # kv_a_proj_with_mqa
    kv_mm += H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank     # kv_b_proj
    o_mm = D * H * cfg.v_head_dim                                               # o_proj
    return q_mm + kv_mm + o_mm, q_norm + cfg.kv_lora_rank                       # + kv_a_layernorm


def _indexer_parts(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, norm weights) of one V3.2 lightning indexer; (0, 0) without DSA."""
    if not cfg.is_dsa:
        return 0, 0
    I, E, D = cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size
    return I * E * cfg.q_lora_rank + E * D + I * D, 2 * E  # wq_b, wk, weights_proj; k_norm weight + bias


def _expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size                      # gate, up, down


def _router_bias(cfg: ModelConfig) -> int:
    # Only noaux_tc routing has e_score_correction_bias (V3); V2-style greedy checkpoints have none.
    return cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0


@dataclass(frozen=True)
class _Block:
    """One decoder block split into the parts the counts need."""

    attn_mm: int
    attn_norm: int
    dense_mlp: int
    router_w: int
    router_b: int
    routed: int
    routed_active: int
    shared: int
    norms: int  # input_layernorm + post_attention_layernorm
    index_mm: int = 0    # V3.2 indexer matmul weights (part of the attention)
    index_norm: int = 0  # its k_norm

    @property
    def attention(self) -> int:
        return self.attn_mm + self.attn_norm + self.index_mm + self.index_norm

    @property
    def total(self) -> int:
        return (self.attention + self.dense_mlp + self.router_w + self.router_b + self.routed
                + self.shared + self.norms)

    @property
    def active(self) -> int:
        return self.total - self.routed + self.routed_active

    @property
    def active_matmul(self) -> int:
        return self.attn_mm + self.index_mm + self.dense_mlp + self.router_w + self.routed_active + self.shared


def _block(cfg: ModelConfig, moe: bool) -> _Block:
    attn_mm, attn_norm = _attention_parts(cfg)
    index_mm, index_norm = _indexer_parts(cfg)
    norms = 2 * cfg.hidden_size
    if not moe:
        return _Block(attn_mm, attn_norm, 3 * cfg.hidden_size * cfg.intermediate_size, 0, 0, 0, 0, 0, norms,
                      index_mm, index_norm)
    per_expert = _expert_params(cfg)
    return _Block(attn_mm, attn_norm, 0, cfg.n_routed_experts * cfg.hidden_size, _router_bias(cfg),
                  cfg.n_routed_experts * per_expert, cfg.num_experts_per_tok * per_expert,
                  cfg.n_shared_experts * per_expert, norms, index_mm, index_norm)


def _mtp_block_is_moe(cfg: ModelConfig, i: int) -> bool:
    # MTP layers sit at index num_hidden_layers + i, past first_k_dense_replace, so they are MoE
    # layers whenever the model has experts (as in V3's checkpoint).
    return cfg.n_routed_experts > 0 and cfg.num_hidden_layers + i >= cfg.first_k_dense_replace


def block_params(cfg: ModelConfig, moe: bool) -> dict[str, int]:
    """One decoder block's parameters: `total`, `routed` (all routed experts, the part expert parallelism
    shards), `active_matmul` (what 6N multiplies per token) and `attention_matmul` (MLA projections)."""
    b = _block(cfg, moe)
    return {"total": b.total, "routed": b.routed, "active_matmul": b.active_matmul, "attention_matmul": b.attn_mm}


def mtp_block_is_moe(cfg: ModelConfig, i: int = 0) -> bool:
    """Whether MTP module i's decoder block is a MoE block."""
    return _mtp_block_is_moe(cfg, i)


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of `cfg` (see the module docstring for the shapes)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    kinds = {moe: _block(cfg, moe) for moe in set(cfg.is_moe_layer)}  # a dense and a MoE block at most
    blocks = [kinds[moe] for moe in cfg.is_moe_layer]
    embedding = V * D
    lm_head = 0 if cfg.tie_word_embeddings else V * D
    final_norm = D
    total = embedding + sum(b.total for b in blocks) + final_norm + lm_head
    active = embedding + sum(b.active for b in blocks) + final_norm + lm_head
    mtp = mtp_mm = 0
    for i in range(cfg.num_nextn_predict_layers):
        b = _block(cfg, _mtp_block_is_moe(cfg, i))
        own_norms = 3 * D                                                     # enorm, hnorm, shared_head.norm
        eh_proj = D * 2 * D
        mtp += own_norms + eh_proj + b.total
        mtp_mm += eh_proj + b.active_matmul + V * D                           # the shared head runs again
    return ParamCounts(
        total_params=total,
        active_params=active,
        mtp_params=mtp,
        mtp_params_with_copies=mtp + cfg.num_nextn_predict_layers * 2 * V * D,
        routed_expert_params=sum(b.routed for b in blocks),
        embedding_params=embedding,
        lm_head_params=lm_head,
        attention_params=sum(b.attention for b in blocks),
        dense_mlp_params=sum(b.dense_mlp for b in blocks),
        shared_expert_params=sum(b.shared for b in blocks),
        router_params=sum(b.router_w + b.router_b for b in blocks),
        norm_params=sum(b.attn_norm + b.index_norm + b.norms for b in blocks) + final_norm,
        active_matmul_params=sum(b.active_matmul for b in blocks) + V * D,
        mtp_active_matmul_params=mtp_mm,
        indexer_params=sum(b.index_mm + b.index_norm for b in blocks),
    )


def latent_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """MLA caches one latent (kv_lora_rank) plus one shared rope key (qk_rope_head_dim) per layer per
    token, whatever the head count (V3 report section 2.1.1)."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes


def indexer_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """V3.2 also caches each token's indexer key: index_head_dim values per layer (0 without DSA)."""
    return cfg.num_hidden_layers * cfg.index_head_dim * dtype_bytes if cfg.is_dsa else 0


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Everything decoding caches per token: the latent, plus V3.2's indexer keys, at dtype_bytes each.
    MTP layers are not counted: they are an optional draft head, not part of the served model's cache."""
    return latent_cache_bytes_per_token(cfg, dtype_bytes) + indexer_cache_bytes_per_token(cfg, dtype_bytes)


def attended_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Keys the main attention of one query sees on average over a causal sequence of seq_len tokens.

    Dense: seq_len / 2 (the half-T convention of FlashAttention's and PaLM's accounting). DSA attends to at
    most K = index_topk of them: query i sees min(i, K), on average K - K^2 / (2T) once T > K.
    """
    T = seq_len
    if not cfg.is_dsa or T <= cfg.index_topk:
        return T / 2
    K = cfg.index_topk
    return K - K * K / (2 * T)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, num_layers: int | None = None) -> float:
    """Training FLOPs per token of the attention scores and the value mix (no weights involved).

    A query attends with each of its H heads to attended_keys() keys: the score q.k costs 2*qk_head_dim
    FLOPs per (head, key) and the value mix p*v costs 2*v_head_dim. Forward per token and layer:
    2*H*(qk_head_dim+v_head_dim)*keys. The backward pass costs twice the forward (gradients w.r.t. both
    operands of both products), so training = 3 x forward. Training runs the non-absorbed MLA path, so
    qk_head_dim (nope + rope) and v_head_dim are the per-head widths.

    V3.2 (DSA): the main attention sees at most index_topk keys (the FLOPs of a sparse kernel; nanoseek's
    naive path masks a dense product instead), and the lightning indexer scores every earlier key: I heads
    of an E-dim dot product plus the weighted sum over heads, 2*I*(E + 1) FLOPs per key, seq_len/2 keys on
    average, also x 3 (the indexer trains through its KL loss).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    flops = 6.0 * n * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * attended_keys(cfg, seq_len)
    if cfg.is_dsa:
        flops += 6.0 * n * cfg.index_n_heads * (cfg.index_head_dim + 1) * seq_len / 2
    return flops


def decode_attention_flops_per_token(cfg: ModelConfig, context_len: int) -> float:
    """Forward FLOPs of one decode step's attention core at context_len cached tokens, all layers.

    Decoding runs the absorbed path against the cached latents: per head and key, the score costs
    2*(C + R) FLOPs (latent + rope key) and the latent value mix 2*C. Dense MLA does that for every cached
    token; DSA for min(index_topk, context_len) of them, after its indexer's 2*I*(E + 1) per cached token.
    """
    if context_len <= 0:
        raise ValueError(f"context_len must be positive, got {context_len}")
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    per_key = 2 * cfg.num_attention_heads * (2 * C + R)
    if not cfg.is_dsa:
        return cfg.num_hidden_layers * per_key * context_len
    index = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * context_len
    return cfg.num_hidden_layers * (index + per_key * min(cfg.index_topk, context_len))


def training_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token at sequence length `seq_len`.

    = 6 * active matmul weights + attention_flops_per_token. Each weight in a matmul costs one multiply
    and one add per token forward (2N) and twice that backward (activation and weight gradients, 4N).
    Active matmul weights are the attention projections, dense MLPs, router gates, the top_k routed plus
    the shared experts of each MoE layer, and lm_head; the embedding lookup, norms and biases are not
    matmuls and elementwise work (softmax, SiLU, norms, rope) is left out, as in the usual 6N rule.
    With `include_mtp` (the default, since training trains what the config holds), each MTP module adds
    6 * (eh_proj + its block's active matmuls + the shared head) plus one layer of attention.
    """
    pc = count_params(cfg)
    flops = 6.0 * pc.active_matmul_params + attention_flops_per_token(cfg, seq_len)
    if include_mtp and cfg.num_nextn_predict_layers:
        flops += 6.0 * pc.mtp_active_matmul_params
        flops += attention_flops_per_token(cfg, seq_len, num_layers=cfg.num_nextn_predict_layers)
    return flops


# ----------------------------------------------------------------------------- formatting
def human(x: float, unit: str = "") -> str:
    """4 significant digits with a K/M/B/T suffix (671.0B, 37.55B, 926.7M); FLOPs use G/T/P via unit."""
    suffixes = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")] if unit else \
        [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")]
    for scale, s in suffixes:
        if abs(x) >= scale:
            v = x / scale
            digits = max(0, 4 - len(str(int(abs(v)))))
            return f"{v:.{digits}f}{' ' if unit else ''}{s}{unit}"
    return f"{x:g}{' ' if unit else ''}{unit}"


def summarize(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, int | float]:
    """Everything `nanoseek params --json` prints, as one flat dict."""
    d: dict[str, int | float] = dict(count_params(cfg).to_dict())
    d["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(cfg)
    d["latent_cache_bytes_per_token"] = latent_cache_bytes_per_token(cfg)
    d["indexer_cache_bytes_per_token"] = indexer_cache_bytes_per_token(cfg)
    d["decode_attention_flops_per_token"] = decode_attention_flops_per_token(cfg, seq_len)
    d["seq_len"] = seq_len
    d["training_flops_per_token"] = training_flops_per_token(cfg, seq_len, include_mtp=True)
    d["training_flops_per_token_no_mtp"] = training_flops_per_token(cfg, seq_len, include_mtp=False)
    return d


def format_table(name: str, cfg: ModelConfig, s: dict[str, int | float]) -> str:
    total = s["total_params"]
    rows: list[tuple[str, str, str]] = [
        ("total params", human(total), f"{total:,}"),
        ("active params / token", human(s["active_params"]), f"{s['active_params']:,} ({s['active_params'] / total:.1%})"),
        ("  routed experts (all)", human(s["routed_expert_params"]), f"{s['routed_expert_params']:,}"),
        ("  shared experts", human(s["shared_expert_params"]), f"{s['shared_expert_params']:,}"),
        ("  dense MLPs", human(s["dense_mlp_params"]), f"{s['dense_mlp_params']:,}"),
        ("  attention (MLA)", human(s["attention_params"]), f"{s['attention_params']:,}"),
        ("  routers", human(s["router_params"]), f"{s['router_params']:,}"),
        ("  embedding", human(s["embedding_params"]), f"{s['embedding_params']:,}"),
        ("  lm_head", human(s["lm_head_params"]) if s["lm_head_params"] else "tied", f"{s['lm_head_params']:,}"),
        (f"MTP params ({cfg.num_nextn_predict_layers} module(s), own)", human(s["mtp_params"]), f"{s['mtp_params']:,}"),
        ("MTP params with emb+head copies", human(s["mtp_params_with_copies"]), f"{s['mtp_params_with_copies']:,}"),
        ("KV cache / token (BF16, latent)", f"{s['latent_cache_bytes_per_token']:,} bytes",
         f"{cfg.num_hidden_layers} x ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x 2"),
        (f"training FLOPs / token @ {s['seq_len']}", human(s["training_flops_per_token"], "FLOPs"),
         f"{s['training_flops_per_token']:.4e}" + (" (with MTP)" if cfg.num_nextn_predict_layers else "")),
    ]
    if cfg.num_nextn_predict_layers:
        rows.append(("  without MTP", human(s["training_flops_per_token_no_mtp"], "FLOPs"),
                     f"{s['training_flops_per_token_no_mtp']:.4e}"))
    rows.append((f"decode attention FLOPs @ {s['seq_len']} cached", human(s["decode_attention_flops_per_token"], "FLOPs"),
                 f"{s['decode_attention_flops_per_token']:.4e}"
                 + (f" (top-{cfg.index_topk} of {s['seq_len']} + indexer)" if cfg.is_dsa else " (all cached tokens)")))
    if cfg.is_dsa:
        kv = next(i for i, r in enumerate(rows) if r[0].startswith("KV cache"))
        rows[kv + 1:kv + 1] = [
            ("KV cache / token (BF16, indexer keys)", f"{s['indexer_cache_bytes_per_token']:,} bytes",
             f"{cfg.num_hidden_layers} x {cfg.index_head_dim} x 2"),
            ("KV cache / token (BF16, total)", f"{s['kv_cache_bytes_per_token']:,} bytes", "latent + indexer keys")]
        mla = next(i for i, r in enumerate(rows) if r[0] == "  attention (MLA)")
        rows[mla + 1:mla + 1] = [("    V3.2 indexers", human(s["indexer_params"]),
                                  f"{s['indexer_params']:,} ({cfg.index_n_heads} heads x {cfg.index_head_dim}, "
                                  f"top-{cfg.index_topk})")]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"model: {name}"]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset NAME | --config PATH`, shared with `nanoseek cost`."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", metavar="NAME", help="a built-in preset (tiny, small, small-dsa, bench, deepseek-v2-lite, "
                                                    "deepseek-v3, deepseek-v3.2)")
    g.add_argument("--config", metavar="PATH",
                   help="an HF config.json, a checkpoint directory, or a nanoseek TOML run config ([model] section)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs (default 4096)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_from_args(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    from nanoseek.config_io import resolve_model_config

    cfg = resolve_model_config(args.preset, args.config)
    return (args.preset or str(args.config)), cfg


def error(command: str, msg: str) -> int:
    """The one-line error of nanoseek.cli's style, for the commands that check their own arguments."""
    print(f"nanoseek {command}: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        name, cfg = model_from_args(args)
    except ConfigError as e:
        return error("params", str(e))
    if args.seq_len <= 0:
        return error("params", f"--seq-len must be positive, got {args.seq_len}")
    s = summarize(cfg, args.seq_len)
    if args.json:
        print(json.dumps({"model": name, **s}, indent=2))
    else:
        print(format_table(name, cfg, s))
    return 0
