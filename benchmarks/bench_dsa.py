"""Attention cost per token against context length: dense MLA vs DeepSeek Sparse Attention (V3.2).

One attention layer shaped like a small V3.2 layer: the released latent sizes (kv_lora_rank 512, rope 64,
nope 128, v 128, indexer head 128) with 8 MLA heads and 4 indexer heads (V3.2's 128 : 64 ratio, so the
per-key cost of the indexer against dense MLA is the released one), hidden size 1024. Timed side by
side in one run, alternating, for contexts of 1K to 32K tokens, with index_topk 2048 (as released) and
512:

  decode       one new token against a cache filled to L: MLA's absorbed attention over all L cached
               latents vs SparseMLA.attend_cached (the indexer over L keys, then absorbed attention over
               the K selected latents). Projections included, cache writes not (the same for both).
  prefill      a 64-token chunk at the end of an L-token context (what a long prefill costs per token
               near position L): MLA the cheaper of its two paths (absorbed against the cache, or naive
               with the cached latents expanded by kv_b_proj) vs attend_cached on the chunk.
  full prefill whole sequences of 1K-4K tokens from scratch: MLA's naive causal SDPA vs DSA's naive
               masked path (what training runs: dense attention plus a mask, so never cheaper) and vs the
               sparse path (attend_cached in 256-query chunks).

Both sides are the plain torch paths of nanoseek.model (the C++ decode kernels cover dense MLA only), in
fp32. Reported: milliseconds per token, the MLA / DSA time ratio (> 1: DSA faster), and the same ratio
predicted by FLOPs (nanoseek.accounting.decode_attention_flops_per_token) for decode.

Run: `.venv/bin/python -m benchmarks.bench_dsa [--contexts 1024,4096] [--rounds 3]`.
Results: benchmarks/results/dsa.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, median, write_result
from nanoseek.accounting import decode_attention_flops_per_token
from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA
from nanoseek.model.dsa import SparseMLA, causal_bias
from nanoseek.model.layers import Rotary

LAYER = dict(vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, first_k_dense_replace=1,
             n_routed_experts=0, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=32768, num_nextn_predict_layers=0,
             index_n_heads=4, index_head_dim=128)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
TOPKS = (2048, 512)
FULL_PREFILL = (1024, 2048, 4096)
CHUNK = 64


def build(topks):
    """The dense layer and, per index_topk, a sparse layer with the same MLA weights."""
    torch.manual_seed(0)
    dense_cfg = ModelConfig(**{k: v for k, v in LAYER.items() if not k.startswith("index_")})
    mla = MLA(dense_cfg).eval()
    sparse = {}
    for k in topks:
        cfg = ModelConfig(**LAYER, index_topk=k)
        s = SparseMLA(cfg).eval()
        s.load_state_dict(mla.state_dict(), strict=False)  # same MLA; the indexer is its own
        sparse[k] = s
    return dense_cfg, mla, sparse, Rotary(dense_cfg)


def cache(L: int, cfg: ModelConfig):
    """What a cache filled to L holds: [latent | rope key] rows and indexer keys (values do not change costs)."""
    g = torch.Generator().manual_seed(L)
    kv = torch.randn(1, L, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
    keys = torch.randn(1, L, LAYER["index_head_dim"], generator=g)
    return kv, keys


def mla_absorbed(mla: MLA, x, cos, sin, kv, bias):
    q_nope, q_rope, _, _ = mla._project(x, cos, sin)
    out = mla._absorbed(q_nope, q_rope, kv, bias)
    return mla.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


def mla_naive_cached(mla: MLA, x, cos, sin, kv, mask):
    q_nope, q_rope, _, _ = mla._project(x, cos, sin)
    latent, k_rope = kv.split([mla.kv_rank, mla.rope], dim=-1)
    out = mla._naive(q_nope, q_rope, latent, k_rope, mask)  # expands all L cached latents with kv_b_proj
    return mla.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


def dsa_cached(attn: SparseMLA, x, cos, sin, kv, keys, positions):
    return attn.attend_cached(attn.project(x, cos, sin), kv, keys, positions, None)  # one query sees every key


def dsa_sparse_prefill(attn: SparseMLA, x, cos, sin, chunk: int = 256):
    """A whole prefill through the sparse path: the sequence's own rows as the cache, 256 queries at a time."""
    st = attn.project(x, cos, sin)
    T = x.shape[1]
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        part = type(st)(*(getattr(st, f)[:, t0:t1] for f in ("q_nope", "q_rope", "index_q", "index_w")),
                        st.kv_row[:, t0:t1], st.index_key[:, t0:t1])
        positions = torch.arange(t0, t1)[None]
        attn.attend_cached(part, st.kv_row[:, :t1], st.index_key[:, :t1], positions,
                           causal_bias(positions, t1, attn.n_heads))


def ratio_rows(times: dict[str, list[float]], per: int, baseline: str) -> dict:
    ms = {k: median(v) * 1e3 / per for k, v in times.items()}
    return {"ms_per_token": {k: round(v, 4) for k, v in ms.items()},
            "speedup_vs_mla": {k: round(ms[baseline] / v, 2) for k, v in ms.items() if k != baseline}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    ap.add_argument("--full-prefill", default=",".join(map(str, FULL_PREFILL)), help="lengths of whole prefills")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per point (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    full = [int(c) for c in args.full_prefill.split(",") if c]
    cfg, mla, sparse, rotary = build(TOPKS)
    D = cfg.hidden_size
    result = {"layer": {**LAYER, "index_topk": list(TOPKS)}, "decode": {}, "prefill_chunk": {}, "full_prefill": {},
              "notes": "fp32, plain torch paths of nanoseek.model, one layer; ms per token, medians of alternating "
                       f"rounds; prefill_chunk = {CHUNK} new tokens at the end of the context"}
    torch.manual_seed(1)
    with torch.inference_mode():
        for L in contexts:
            kv, keys = cache(L, cfg)
            # decode: the token at position L - 1 (its own row is the cache's last)
            x = torch.randn(1, 1, D)
            cos, sin = rotary(torch.tensor([L - 1]))
            pos = torch.tensor([[L - 1]])
            fns = {"mla": lambda: mla_absorbed(mla, x, cos, sin, kv, None)}
            for k, s in sparse.items():
                fns[f"dsa_top{k}"] = lambda s=s: dsa_cached(s, x, cos, sin, kv, keys, pos)
            row = ratio_rows(alternate(fns, args.rounds), 1, "mla")
            dense_flops = decode_attention_flops_per_token(cfg, L)
            row["flops_speedup_vs_mla"] = {f"dsa_top{k}": round(dense_flops / decode_attention_flops_per_token(
                cfg.replace(index_topk=k, index_n_heads=LAYER["index_n_heads"], index_head_dim=LAYER["index_head_dim"]),
                L), 2) for k in sparse}
            result["decode"][L] = row
            print(f"decode   L={L:6d}  " + _fmt(row), flush=True)
            # chunked prefill: CHUNK tokens at positions L - CHUNK .. L - 1
            x = torch.randn(1, CHUNK, D)
            positions = torch.arange(L - CHUNK, L)[None]
            cos, sin = rotary(positions[0])
            allowed = torch.arange(L)[None, None, :] <= positions[:, :, None]  # [1, CHUNK, L]
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
            bias = bias[:, :, None, :].expand(1, CHUNK, cfg.num_attention_heads, L).reshape(1, -1, L)
            fns = {"mla_absorbed": lambda: mla_absorbed(mla, x, cos, sin, kv, bias),
                   "mla_naive": lambda: mla_naive_cached(mla, x, cos, sin, kv, allowed.unsqueeze(1))}
            for k, s in sparse.items():
                fns[f"dsa_top{k}"] = lambda s=s: dsa_cached(s, x, cos, sin, kv, keys, positions)
            times = alternate(fns, args.rounds)
            best = min(("mla_absorbed", "mla_naive"), key=lambda n: median(times[n]))
            times["mla"] = times[best]
            row = ratio_rows(times, CHUNK, "mla")
            row["mla_path"] = best.removeprefix("mla_")
            result["prefill_chunk"][L] = row
            print(f"prefill  L={L:6d}  " + _fmt(row), flush=True)
            del kv, keys, bias
        for T in full:
            x = torch.randn(1, T, D)
            cos, sin = rotary(torch.arange(T))
            fns = {"mla": lambda: mla(x, cos, sin)}
            for k, s in sparse.items():
                fns[f"dsa_top{k}_masked"] = lambda s=s: s(x, cos, sin)
                fns[f"dsa_top{k}_sparse"] = lambda s=s: dsa_sparse_prefill(s, x, cos, sin)
            row = ratio_rows(alternate(fns, max(1, args.rounds - 1)), T, "mla")
            result["full_prefill"][T] = row
            print(f"full     T={T:6d}  " + _fmt(row), flush=True)
    path = write_result("dsa", result)
    print(f"wrote {path}")
    return result


def _fmt(row: dict) -> str:
    ms = row["ms_per_token"]
    return "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items() if not k.startswith("mla_")) + "  |  speedup " + \
        "  ".join(f"{k} {v}x" for k, v in row["speedup_vs_mla"].items() if not k.startswith("mla_"))


if __name__ == "__main__":
    main()
