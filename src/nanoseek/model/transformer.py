"""The DeepSeek-V3 / V3.2 decoder: embedding, MLA (or V3.2 sparse MLA) + (dense | MoE) blocks, final norm,
head, and MTP modules.

Read top to bottom: Block (pre-norm attention and feed-forward), MTPModule (V3 section 2.2), Transformer.
Module names mirror the Hugging Face checkpoint layout so that nanoseek.hf's key map stays a prefix change.

MTP (V3 eq. 21-25): at depth k, position i combines the previous depth's hidden state h_i (taken before
the final norm) with the embedding of token i+k: h' = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i)] (embedding
first), runs one decoder block, and predicts token i+k+1 through the shared output head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA, CacheView, LatentCache
from .dsa import Indexer, SparseMLA
from .layers import MLP, RMSNorm, Rotary
from .moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SparseMLA(cfg) if cfg.is_dsa else MLA(cfg)  # V3.2: MLA over the indexer's top-k
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache: CacheView | None = None, layer: int = 0, aux_alpha: float = 0.0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h, aux_alpha)
        else:
            y, aux = self.mlp(h), None
        return x + y, aux


class MTPModule(Block):
    """A full decoder block plus the input combination and its own output norm; head and embedding are shared."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__(cfg, moe)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))


@dataclass
class TrainOutput:
    loss: torch.Tensor      # lm_loss + mtp_weight * mtp_loss + aux_loss
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # On the meta device (loaders build there) nn.Embedding's own normal_ init would import torch._dynamo,
        # seconds at every start: given an empty weight it skips it. Elsewhere its draws stay part of the seeded init.
        skeleton = torch.empty(cfg.vocab_size, cfg.hidden_size) if torch.get_default_device().type == "meta" else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=skeleton)
        self.layers = nn.ModuleList(Block(cfg, moe) for moe in cfg.is_moe_layer)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        mtp_moe = cfg.n_routed_experts > 0 and cfg.num_hidden_layers >= cfg.first_k_dense_replace
        self.mtp = nn.ModuleList(MTPModule(cfg, mtp_moe) for _ in range(cfg.num_nextn_predict_layers))
        self.rotary = Rotary(cfg)
        self.init_weights()

    # ------------------------------------------------------------------ init and bookkeeping
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) everywhere; residual-output projections scaled by 1/sqrt(2 * depth)
        (GPT-2 style) so the residual stream does not grow with depth; norms 1, balancing bias 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * max(1, self.config.num_hidden_layers))
        for name, p in self.named_parameters():
            if p.is_meta:  # a skeleton a loader fills (and normal_ on meta would import torch._dynamo: seconds)
                continue
            if name.endswith("norm.weight") or ".norm." in name or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):  # the indexer's k_norm LayerNorm
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self, include_mtp: bool = True) -> list[MoE]:
        mods = [b.mlp for b in self.layers] + ([b.mlp for b in self.mtp] if include_mtp else [])
        return [m for m in mods if isinstance(m, MoE)]

    def reset_load(self) -> None:
        for m in self.moe_layers():
            m.load.zero_()

    def cast(self, dtype: torch.dtype) -> "Transformer":
        """Cast weights to dtype but keep the router (weights and balancing bias) and the DSA indexer's head
        weights (weights_proj, as transformers and DeepSeek keep them) in fp32."""
        self.to(dtype)
        for m in self.moe_layers():
            m.gate.float()
        for m in self.modules():
            if isinstance(m, Indexer):
                m.weights_proj.float()
        self.rotary.inv_freq.data = self.rotary.inv_freq.float()
        return self

    def num_params(self, include_mtp: bool = False) -> int:
        seen = {id(p): p for n, p in self.named_parameters() if include_mtp or not n.startswith("mtp.")}
        return sum(p.numel() for p in seen.values())

    # ------------------------------------------------------------------ forward passes
    def hidden_states(self, input_ids: torch.Tensor, aux_alpha: float = 0.0):
        """Last-layer output before the final norm [B,T,D], and the summed balance loss (or None)."""
        T = input_ids.shape[1]
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device))
        x = self.embed_tokens(input_ids)
        aux_total = None
        for block in self.layers:
            x, aux = block(x, cos, sin, aux_alpha=aux_alpha)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return x, aux_total

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,V]."""
        h, _ = self.hidden_states(input_ids)
        return self.lm_head(self.norm(h))

    def mtp_hidden_states(self, h: torch.Tensor, input_ids: torch.Tensor, aux_alpha: float = 0.0):
        """Yields (depth k, hidden [B, T-k, D], aux) for each MTP module; position i predicts token i+k+1."""
        T = input_ids.shape[1]
        for k, mod in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.rotary(torch.arange(T - k, device=input_ids.device))
            x = mod.combine(h[:, : T - k], self.embed_tokens(input_ids[:, k:]))
            h, aux = mod(x, cos, sin, aux_alpha=aux_alpha)
            yield k, mod, h, aux

    def forward_train(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3,
                      aux_alpha: float = 0.0) -> TrainOutput:
        """Language-model loss, MTP loss (mean over depths) and balance loss; targets -100 are ignored."""
        h, aux = self.hidden_states(input_ids, aux_alpha)
        logits = self.lm_head(self.norm(h))
        mtp_logits = []
        for k, mod, hk, aux_k in self.mtp_hidden_states(h, input_ids, aux_alpha):
            mtp_logits.append(self.lm_head(mod.shared_head.norm(hk)))
            if aux_k is not None:
                aux = aux_k if aux is None else aux + aux_k
        return self.train_losses(logits, mtp_logits, targets, aux, mtp_weight)

    @staticmethod
    def train_losses(logits: torch.Tensor, mtp_logits: list[torch.Tensor], targets: torch.Tensor,
                     aux: torch.Tensor | None, mtp_weight: float) -> TrainOutput:
        """The training losses from the head's logits [B,T,V] and each MTP depth's [B,T-k,V]; position i of
        depth k predicts token i+k+1 = targets[i+k]. (A pipeline's last stage calls this too.)"""
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        zero = lm_loss.new_zeros(())
        mtp_losses = [F.cross_entropy(lg.float().flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100)
                      for k, lg in enumerate(mtp_logits, start=1)]
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else zero
        aux_loss = aux if aux is not None else zero
        return TrainOutput(lm_loss + mtp_weight * mtp_loss + aux_loss, lm_loss, mtp_loss, aux_loss)

    # ------------------------------------------------------------------ cached inference
    def cache_layout(self) -> tuple[int, dict[str, int]]:
        """What a cache for this model holds: the number of layers (main, then MTP) and, per stream, the
        values cached per token and layer (MLA: the latent and the rope key, C + R; V3.2 adds the indexer key, E)."""
        return self.config.num_hidden_layers + len(self.mtp), dict(self.layers[0].self_attn.cache_widths)

    def new_cache(self, rows: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> LatentCache:
        """A contiguous reference cache for `rows` sequences of up to max_len tokens (the engine keeps its
        own, nanoseek.infer.cache); run forwards on it through cache.view(rows, start_pos, n_new)."""
        ref = self.embed_tokens.weight
        n_layers, widths = self.cache_layout()
        return LatentCache(n_layers, rows, max_len, widths, dtype or ref.dtype, device or ref.device)

    def forward_cached(self, input_ids: torch.Tensor, cache: CacheView,
                       logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T new tokens per row against the cache; returns logits [B,T,V] and pre-norm hidden [B,T,D].

        `cache` says where the tokens go (CacheView: positions, what to read and write). With logits_at
        ([B] indices into T) only those positions get logits ([B,1,V]): a prefill samples from its last
        position only, and the head over every prompt token is a large share of its FLOPs.
        """
        cos, sin = self.rotary(cache.positions)
        x = self.run_blocks(self.embed_tokens(input_ids), cos, sin, cache)
        return self.lm_head(self.norm(_pick(x, logits_at))), x

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """The decoder blocks in order over the new tokens' hidden states x [B,T,D], against the cache."""
        for i, block in enumerate(self.layers):
            x, _ = block(x, cos, sin, cache, layer=i)
        return x

    def mtp_forward_cached(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: CacheView, depth: int = 0,
                           logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` at the cache's positions: combines hidden[i] with Emb(next_ids[i]) (the token at
        position i+1) and returns logits for token i+2 and the module's hidden state (logits_at: as in
        forward_cached). Its cache layer comes after the main model's."""
        if depth >= len(self.mtp):
            raise ValueError(f"the model has {len(self.mtp)} MTP module(s); depth {depth} does not exist")
        mod = self.mtp[depth]
        cos, sin = self.rotary(cache.positions)
        x = mod.combine(hidden, self.embed_tokens(next_ids))
        h, _ = mod(x, cos, sin, cache, layer=self.config.num_hidden_layers + depth)
        return self.lm_head(mod.shared_head.norm(_pick(h, logits_at))), h


def _pick(h_BTD: torch.Tensor, at_B: torch.Tensor | None) -> torch.Tensor:
    """h at one position per row ([B,1,D]), or all of h."""
    if at_B is None:
        return h_BTD
    return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), at_B].unsqueeze(1)
