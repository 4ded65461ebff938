"""DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556 section 2.1): a lightning indexer picks, for
each query, the index_topk earlier tokens that MLA then attends to.

Shapes: B batch, T queries (new tokens), L key positions (the sequence, or the cache), H MLA heads,
C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, I index_n_heads, E index_head_dim,
K = min(index_topk, L) selected tokens per query.

The lightning indexer (report eq. 1) scores query t against key s as
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] * E**-0.5)
  * q[t, j]: wq_b applied to MLA's normalised q-LoRA latent c_Q, split into I heads of E;
  * k[s] = k_norm(wk(h[s])): ONE key per token, shared by the indexer heads (MQA), with a LayerNorm that
    has a bias, unlike every other norm of the model;
  * w[t, j] = weights_proj(h[t]) * I**-0.5: a per-head weight computed from the hidden state (kept in fp32);
  * everything from the dot products on is fp32.
The first R dims of q and k are rotated with the model's cos/sin, *half-split* (pairs (i, i + R/2)) even
though MLA's official weights rotate interleaved pairs: DeepSeek's first V3.2 inference code rotated them
interleaved and lost accuracy (fixed 2025-11). DeepSeek's kernels also rotate q and k by a Hadamard matrix
and score in 8-bit floats; the rotation is orthogonal (Hq . Hk = q . k) and 8-bit scoring is a speed
measure, so, as in transformers' DeepseekV32Indexer, both are left out and these are the exact fp32 scores.

Selection: the K highest scores among the keys the causal mask allows, by torch.topk (transformers' call;
its tie-breaking is what we inherit). MLA then runs on those tokens only:
  * naive path (training, prefill): the selection is a [B, T, L] mask given to SDPA, i.e. MLA with one more
    mask. When L <= index_topk every visible token is selected and this is exactly causal MLA;
  * absorbed path (decode): the selected rows of the latent cache are gathered and absorbed attention runs
    over those K rows only (MLA in MQA mode, the report's instantiation): O(K) per query instead of O(L).
Training (report section 2.1.1), from a V3 checkpoint with fresh indexers: `set_train_stage(model, stage)`
  * "dense" (warm-up): attention stays dense, and each layer's indexer learns the main attention's
    distribution: KL(p_t || softmax(I_t)) per query t, where p_t is the attention probabilities summed over
    the heads and L1-normalised (the caller freezes everything but the indexers);
  * "sparse": attention over the top-k selection, the same KL restricted to the selected tokens; the
    indexer's inputs are detached, so it learns from the KL only and the model from the LM loss only.
  Each layer leaves its KL (mean over queries) in `indexer_kl`; `indexer_kl_loss(model)` averages them.
Cache: beside MLA's "latent" stream each token's indexer key is cached as the stream "index_key" (E values
per token and layer; CacheView.write / read), so a decode step scores its query against every cached key
without recomputing them.
The indexer stays O(L) per query, but with I * E multiply-adds per key (64 x 128 for V3.2) against
H * (2C + R) for dense absorbed MLA (128 x 1088).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA, CacheView
from .layers import apply_rope

# Scores are built this many fp32 elements ([queries, I, L]) at a time, so that a long prefill never holds
# the whole [T, I, L] product (16K tokens x 64 heads would be 64 GiB).
_SCORE_CHUNK = 1 << 24


class Indexer(nn.Module):
    """The lightning indexer of one layer: its query, its (cached) key, and the scores between them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first R dims, half-split whatever MLA's layout (module docstring)."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin, interleave=False), rest], dim=-1)

    def keys(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k [B, T, E]: what a cache keeps per token and layer beside the latent."""
        k = self.k_norm(self.wk(x_BTD))
        return self._rope(k.unsqueeze(2), cos, sin).squeeze(2)

    def queries(self, x_BTD: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, T, I, E] and the fp32 head weights w [B, T, I] (scaled by I**-0.5)."""
        B, T, _ = x_BTD.shape
        q = self._rope(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), cos, sin)
        w = self.weights_proj(x_BTD.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
        return q, w

    def scores(self, q_BTIE: torch.Tensor, w_BTI: torch.Tensor, k_BLE: torch.Tensor) -> torch.Tensor:
        """Index scores [B, T, L] in fp32 (no mask). Differentiable: the indexer's training losses use it."""
        B, T, n_heads, E = q_BTIE.shape
        L = k_BLE.shape[1]
        # keys as the row operand: each cached key is read once, contiguously (decode is bandwidth-bound)
        s = torch.bmm(k_BLE.float(), q_BTIE.float().reshape(B, T * n_heads, E).transpose(1, 2))  # [B, L, T*I]
        s = F.relu(s * self.head_dim ** -0.5).view(B, L, T, n_heads)
        return torch.einsum("blti,bti->btl", s, w_BTI)  # sum over heads, weighted

    @torch.no_grad()
    def select(self, q_BTIE: torch.Tensor, w_BTI: torch.Tensor, k_BLE: torch.Tensor, positions_BT: torch.Tensor):
        """Top-K keys per query among keys at positions <= the query's own (key j sits at position j).

        Returns (idx [B, T, K] int64, valid [B, T, K] bool). K = min(index_topk, L), as in transformers, so a
        query that sees fewer than K keys gets some disallowed picks: `valid` marks them False.
        """
        B, T, n_heads, _ = q_BTIE.shape
        L = k_BLE.shape[1]
        K = min(self.topk, L)
        idx = torch.empty(B, T, K, dtype=torch.long, device=q_BTIE.device)
        valid = torch.empty(B, T, K, dtype=torch.bool, device=q_BTIE.device)
        keys = torch.arange(L, device=q_BTIE.device)
        step = max(1, _SCORE_CHUNK // (n_heads * L))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            s = self.scores(q_BTIE[:, t0:t1], w_BTI[:, t0:t1], k_BLE)
            s = s.masked_fill(keys > positions_BT[:, t0:t1, None], float("-inf"))
            top = s.topk(K, dim=-1)
            idx[:, t0:t1] = top.indices
            valid[:, t0:t1] = top.values > float("-inf")
        return idx, valid


@dataclass
class SparseStep:
    """What SparseMLA.project computes for T new tokens: the queries, and the rows a cache stores."""
    q_nope: torch.Tensor     # [B, T, H, N]
    q_rope: torch.Tensor     # [B, T, H, R], rotated
    index_q: torch.Tensor    # [B, T, I, E], rotated
    index_w: torch.Tensor    # [B, T, I] fp32
    kv_row: torch.Tensor     # [B, T, C + R]: normalised latent | rotated rope key (MLA's cache row)
    index_key: torch.Tensor  # [B, T, E]: the indexer key (V3.2's extra cache row)


class SparseMLA(MLA):
    """MLA whose queries attend only to the tokens their layer's lightning indexer selects."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.indexer = Indexer(cfg)
        self.cache_widths = {**self.cache_widths, "index_key": cfg.index_head_dim}
        self.train_stage: str | None = None        # None, or one of TRAIN_STAGES (set_train_stage)
        self.indexer_kl: torch.Tensor | None = None  # the last training forward's KL (a 0-dim tensor)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                detach_indexer: bool = False) -> SparseStep:
        """The queries and cache rows of x's tokens; detach_indexer cuts the indexer off the model's graph."""
        q_latent = self._query_latent(x)
        q_nope, q_rope, latent, k_rope = self._project(x, cos, sin, q_latent)
        xi, qi = (x.detach(), q_latent.detach()) if detach_indexer else (x, q_latent)
        index_q, index_w = self.indexer.queries(xi, qi, cos, sin)
        return SparseStep(q_nope, q_rope, index_q, index_w, torch.cat([latent, k_rope], dim=-1),
                          self.indexer.keys(xi, cos, sin))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheView | None = None,
                layer: int = 0) -> torch.Tensor:
        """Without a cache the naive path over the whole sequence (training); with one, the new tokens' rows
        are written ("latent" and "index_key") and a prefill takes the naive path, a decode step the
        absorbed path over the cached rows its queries select."""
        if cache is None:
            if self.train_stage is not None:
                return self.train_forward(x, cos, sin)
            if x.shape[1] <= self.indexer.topk:
                return super().forward(x, cos, sin)  # every visible token is selected: exactly causal MLA
            return self.attend_sequence(self.project(x, cos, sin))
        st = self.project(x, cos, sin)
        cache.write(layer, "latent", st.kv_row)
        cache.write(layer, "index_key", st.index_key)
        if cache.prefill:  # every row starts at 0: the new tokens attend to each other only
            return self.attend_sequence(st)
        return self.attend_cached(st, cache.read(layer, "latent"), cache.read(layer, "index_key"),
                                  cache.positions, cache.score_bias(self.n_heads))

    def attend_sequence(self, st: SparseStep) -> torch.Tensor:
        """Naive path for st's T tokens at positions 0..T-1 attending to each other -> [B, T, hidden]: MLA
        with the indexer's selection as a [B, T, T] mask (a cache can store st's rows and prefill with this)."""
        B, T, _ = st.kv_row.shape
        latent, k_rope = st.kv_row.split([self.kv_rank, self.rope], dim=-1)
        mask = None  # T <= index_topk: every visible token is selected
        if T > self.indexer.topk:
            positions = torch.arange(T, device=st.kv_row.device).expand(B, T)
            idx, valid = self.indexer.select(st.index_q, st.index_w, st.index_key, positions)
            mask = torch.zeros(B, T, T, dtype=torch.bool, device=idx.device).scatter_(-1, idx, valid).unsqueeze(1)
        out = self._naive(st.q_nope, st.q_rope, latent, k_rope, mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim).to(self.o_proj.weight.dtype))

    def train_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The naive path of a training stage (module docstring): dense ("dense") or top-k ("sparse")
        attention over the sequence, and the indexer's KL to that attention left in self.indexer_kl."""
        B, T, _ = x.shape
        st = self.project(x, cos, sin, detach_indexer=True)
        latent, k_rope = st.kv_row.split([self.kv_rank, self.rope], dim=-1)
        positions = torch.arange(T, device=x.device)
        allowed = (positions[None, :] <= positions[:, None]).expand(B, T, T)  # causal
        mask = None
        if self.train_stage == "sparse" and T > self.indexer.topk:
            idx, valid = self.indexer.select(st.index_q, st.index_w, st.index_key, positions.expand(B, T))
            allowed = torch.zeros(B, T, T, dtype=torch.bool, device=x.device).scatter_(-1, idx, valid)
            mask = allowed.unsqueeze(1)
        out = self._naive(st.q_nope, st.q_rope, latent, k_rope, mask)
        with torch.no_grad():
            target = self._head_summed_probs(st, allowed)
        scores = self.indexer.scores(st.index_q, st.index_w, st.index_key).float()
        # KL(p || q) per query over the allowed keys (p is 0 elsewhere; masked so 0 * -inf never appears), in
        # fp32 under bf16 autocast too: log q rounded to bf16 alone can make it negative
        with torch.autocast(x.device.type, enabled=False):
            log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
            kl = (torch.xlogy(target, target) - target * log_q.masked_fill(~allowed, 0.0)).sum(-1)
        self.indexer_kl = kl.mean()
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim).to(x.dtype))

    def _head_summed_probs(self, st: SparseStep, allowed_BTL: torch.Tensor) -> torch.Tensor:
        """The main attention's probabilities over the allowed keys, summed over heads, L1-normalised
        ([B, T, L] fp32): the indexer's training target."""
        B, T, H, _ = st.q_nope.shape
        latent, k_rope = st.kv_row.split([self.kv_rank, self.rope], dim=-1)
        k_nope = self.kv_b_proj(latent).view(B, -1, H, self.nope + self.v_dim)[..., : self.nope]
        s = torch.einsum("bthn,blhn->bhtl", st.q_nope.float(), k_nope.float())
        s = s + torch.einsum("bthr,blr->bhtl", st.q_rope.float(), k_rope.float())
        p = (s * self.scale).masked_fill(~allowed_BTL[:, None], float("-inf")).softmax(dim=-1).sum(1)
        return p / p.sum(-1, keepdim=True)

    def attend_cached(self, st: SparseStep, kv_BLW: torch.Tensor, index_keys_BLE: torch.Tensor,
                      positions_BT: torch.Tensor, bias_BML: torch.Tensor | None) -> torch.Tensor:
        """The absorbed path: attention of st's queries over the cache rows they select -> [B, T, hidden].

        kv_BLW ([B, L, C + R]) and index_keys_BLE ([B, L, E]) hold the cached rows of positions 0..L-1 (st's
        own rows already written); positions_BT is each query's position and bias_BML the causal score
        bias [B, T*H, L] they give (CacheView.score_bias, causal_bias; None when nothing is masked). Only the
        K selected latent rows per query are gathered and scored, so the cost is O(K) per query after the
        O(L) indexer.
        """
        B, T, H, _ = st.q_nope.shape
        C, dtype = self.kv_rank, kv_BLW.dtype
        L = kv_BLW.shape[1]
        if L <= self.indexer.topk:
            # Every cached token is selected: this is MLA's absorbed attention (no indexer, no gather).
            out = self._absorbed(st.q_nope, st.q_rope, kv_BLW, bias_BML)
            return self.o_proj(out.reshape(B, T, H * self.v_dim).to(self.o_proj.weight.dtype))
        idx, valid = self.indexer.select(st.index_q, st.index_w, index_keys_BLE, positions_BT)  # [B, T, K]
        K = idx.shape[-1]
        rows = torch.arange(B, device=idx.device)[:, None]
        sel = kv_BLW[rows, idx.view(B, T * K)].view(B, T, K, -1)  # [B, T, K, C+R], whole rows copied
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope].to(dtype), w[:, self.nope:].to(dtype)  # [H, N, C], [H, V, C]
        # kv_b's key half folded into the query: q_nope . (W_uk c) = (W_uk^T q_nope) . c
        q = torch.cat([torch.einsum("bthn,hnc->bthc", st.q_nope.to(dtype), w_uk), st.q_rope.to(dtype)], dim=-1)
        scores = torch.matmul(q, sel.transpose(-1, -2)).float() * self.scale  # [B, T, H, K]
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(dtype)
        o_lat = torch.matmul(probs, sel[..., :C])  # [B, T, H, C]
        out = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # kv_b's value half folded into the output
        return self.o_proj(out.reshape(B, T, H * self.v_dim).to(self.o_proj.weight.dtype))


def causal_bias(positions_BT: torch.Tensor, L: int, n_heads: int) -> torch.Tensor | None:
    """Additive [B, T*H, L] score bias letting query (b, t) see keys 0..positions[b, t]; None when every
    query sees all L keys (CacheView.score_bias for a caller that has positions but no cache view)."""
    B, T = positions_BT.shape
    allowed = torch.arange(L, device=positions_BT.device) <= positions_BT[:, :, None]  # [B, T, L]
    if bool(allowed.all()):
        return None
    bias = torch.zeros(allowed.shape, device=positions_BT.device).masked_fill_(~allowed, float("-inf"))
    return bias[:, :, None, :].expand(B, T, n_heads, L).reshape(B, T * n_heads, L)


TRAIN_STAGES = ("dense", "sparse")


def set_train_stage(model: nn.Module, stage: str | None) -> None:
    """Put every SparseMLA of `model` into a training stage (or back to plain forwards with None)."""
    if stage is not None and stage not in TRAIN_STAGES:
        raise ValueError(f"unknown DSA training stage {stage!r}; choose one of {TRAIN_STAGES}")
    for m in model.modules():
        if isinstance(m, SparseMLA):
            m.train_stage, m.indexer_kl = stage, None


def indexer_kl_loss(model: nn.Module) -> torch.Tensor:
    """The mean over layers of the KL each SparseMLA left in its last training forward (then cleared)."""
    kls = []
    for m in model.modules():
        if isinstance(m, SparseMLA) and m.indexer_kl is not None:
            kls.append(m.indexer_kl)
            m.indexer_kl = None
    if not kls:
        raise RuntimeError("no indexer KL to collect: set_train_stage first, then run a training forward")
    return torch.stack(kls).mean()
