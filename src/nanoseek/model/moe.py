"""DeepSeekMoE: router, grouped routed experts, shared experts (V3 report section 2.1.2, V2 section 2.2).

Shape legend: N tokens, D hidden, E routed experts, K experts per token, F expert hidden size,
M = N*K token-expert assignments, G groups.

Router (V3 eq. 12-16): scores s = sigmoid(x W^T) (or softmax for V2 checkpoints). Selection uses s + b,
where b is the auxiliary-loss-free balancing bias; the gate values use s alone. With noaux_tc and
n_group > 1, a group's score is the sum of its top-2 (biased) scores and only the best topk_group groups
(nodes, in the paper) may be chosen; masked groups get -inf so they never win, even when every score is
negative. The weights are normalised when norm_topk_prob and then always scaled by routed_scaling_factor.

Experts are stacked weights ([E, 2F, D] and [E, D, F]), never a Python loop over experts: the
(token, expert) assignments are sorted by expert and multiplied in one grouped GEMM (torch grouped_mm),
or, where grouped_mm is missing, unaligned or not native (see use_grouped_mm), in one batched GEMM over a
zero-padded [E, capacity, D] buffer. MoE.routed_experts is the seam that expert parallelism
(nanoseek.train.parallel) and the CPU decode paths (nanoseek.infer.fast) replace from outside.

No value is read back to the host on the way (a host sync on a GPU, once per layer): the counts are a
scatter-add (bincount sizes its output from the data), grouped_mm takes the offsets on the device, and
the padded buffer of a decode-sized batch is sized from shapes (a token picks an expert at most once,
so no expert gets more than N rows); only a large batch on the padded path reads its true capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP

# Batches of at most this many tokens size the padded expert buffer from shapes, not from the counts.
DECODE_ROWS = 256


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        # The router stays in fp32 whatever the model dtype: tiny score differences flip the top-k.
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns gate weights [N,K] fp32, expert ids [N,K], and the raw scores [N,E] fp32."""
        cfg = self.cfg
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_NE.softmax(dim=-1)
        choice_NE = scores_NE
        if cfg.topk_method == "noaux_tc":
            choice_NE = scores_NE + self.e_score_correction_bias  # selection only, never the weights
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            N, E, G = choice_NE.shape[0], cfg.n_routed_experts, cfg.n_group
            grouped = choice_NE.view(N, G, E // G)
            if cfg.topk_method == "noaux_tc":
                group_scores_NG = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:  # group_limited_greedy (V2): a group is as good as its best expert
                group_scores_NG = grouped.amax(dim=-1)
            keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool)
            keep_NG.scatter_(1, group_scores_NG.topk(cfg.topk_group, dim=-1).indices, True)
            choice_NE = grouped.masked_fill(~keep_NG[:, :, None], float("-inf")).view(N, E)
        idx_NK = choice_NE.topk(cfg.num_experts_per_tok, dim=-1).indices
        w_NK = scores_NE.gather(1, idx_NK)
        if cfg.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return w_NK * cfg.routed_scaling_factor, idx_NK, scores_NE


class GroupedExperts(nn.Module):
    def __init__(self, cfg: ModelConfig, n_experts: int | None = None):
        super().__init__()
        E = cfg.n_routed_experts if n_experts is None else n_experts
        D, Fh = cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fh, D))  # rows [0,F) gate, [F,2F) up
        self.down_proj = nn.Parameter(torch.empty(E, D, Fh))

    def _weights(self, x: torch.Tensor):
        w1, w2 = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        return x, w1, w2

    def use_grouped_mm(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> bool:
        """grouped_mm (no padding), unless torch lacks it, the weights' strides are not 16-byte aligned, or
        the device has no native kernel for the dtype: off the CPU only bf16 is native (CUDA's fallback
        for other dtypes copies the offsets to the host and loops over the experts).

        The rows and counts are there for subclasses that choose by the batch (nanoseek.infer.fast prefers
        the padded GEMM for mid-sized fp32 inference batches on CPU).
        """
        if not hasattr(F, "grouped_mm") or self.gate_up_proj.shape[2] % 8 or self.gate_up_proj.shape[1] % 16:
            return False
        dtype = torch.get_autocast_dtype(x_MD.device.type) if torch.is_autocast_enabled(x_MD.device.type) \
            else x_MD.dtype
        return x_MD.device.type == "cpu" or dtype == torch.bfloat16

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
        """x_MD holds the assignments sorted by expert; counts_E how many each expert got; max_rows, when
        given, bounds every count from shapes (MoE.routed_experts passes N, the number of tokens)."""
        M = x_MD.shape[0]
        # An expert-parallel rank may receive no tokens: the padded path handles that, and keeps the (empty)
        # input in the autograd graph so the all-to-all backward still runs on every rank.
        if M > 0 and self.use_grouped_mm(x_MD, counts_E):
            return self.forward_grouped(x_MD, counts_E)
        return self.forward_sorted_padded(x_MD, counts_E, self.capacity(counts_E, max_rows))

    def capacity(self, counts_E: torch.Tensor, max_rows: int | None) -> int:
        """Rows per expert of the padded buffer: the most any expert got. Reading it is free on the CPU but a
        host sync elsewhere, so there a decode-sized batch takes the bound from shapes instead (at most E/K
        times the rows needed); prefill and training batches still read it."""
        if counts_E.device.type != "cpu" and max_rows is not None and max_rows <= DECODE_ROWS:
            return max_rows
        return int(counts_E.max())

    def forward_grouped(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Both expert GEMMs as grouped GEMMs over the expert-sorted rows."""
        x_MD, w1, w2 = self._weights(x_MD)
        offs = counts_E.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_MD, w1.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)

    def forward_sorted_padded(self, x_MD: torch.Tensor, counts_E: torch.Tensor, cap: int) -> torch.Tensor:
        """The same through forward_padded: each expert's rows scattered into a [E, cap, D] buffer and back."""
        E, M, dev = counts_E.shape[0], x_MD.shape[0], x_MD.device
        expert_M = torch.repeat_interleave(torch.arange(E, device=dev), counts_E, output_size=M)
        row_M = expert_M * cap + torch.arange(M, device=dev) - (counts_E.cumsum(0) - counts_E)[expert_M]
        buf = x_MD.new_zeros(E * cap, x_MD.shape[1]).index_copy(0, row_M, x_MD)
        y_ECD = self.forward_padded(buf.view(E, cap, x_MD.shape[1]))
        return y_ECD.reshape(E * cap, y_ECD.shape[-1]).index_select(0, row_M)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """All experts at once on a [E, cap, D] buffer: two batched GEMMs."""
        x_ECD, w1, w2 = self._weights(x_ECD)
        h = torch.bmm(x_ECD, w1.transpose(1, 2))
        g, u = h.chunk(2, dim=-1)
        return torch.bmm(F.silu(g) * u, w2.transpose(1, 2))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        # Tokens routed to each expert, summed over forwards in training mode (read by the balancer).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x_BTD: torch.Tensor, aux_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        w_NK, idx_NK, scores_NE = self.gate(x_ND)
        y_ND = self.routed_experts(x_ND, w_NK, idx_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        aux = None
        if self.training and aux_alpha > 0:
            aux = self.sequence_aux_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1), aux_alpha)
        return y_ND.view(B, T, D), aux

    def count(self, idx_NK: torch.Tensor) -> torch.Tensor:
        """Assignments per expert [E]; in training mode also added to self.load."""
        flat = idx_NK.flatten()
        counts_E = torch.zeros(self.cfg.n_routed_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        if self.training:
            self.load += counts_E.detach().float()
        return counts_E

    def routed_experts(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """sum_k w_NK[n, k] * expert_{idx_NK[n, k]}(x_ND[n]), [N, D], on this process.

        Each (token, k) assignment gets a row in an expert-sorted layout; tokens are gathered into it with
        index_select and results read back in token-major order, so the weighted sum over k is one batched
        GEMV and no scatter-add (slow and serial on CPU) appears in the forward or the backward.
        """
        counts_E = self.count(idx_NK)
        N, K = idx_NK.shape
        M, dev = N * K, x_ND.device
        order_M = idx_NK.flatten().argsort(stable=True)
        y_sorted = self.experts(x_ND.index_select(0, order_M // K), counts_E, max_rows=N)
        row_M = torch.empty_like(order_M).index_copy_(0, order_M, torch.arange(M, device=dev))
        y_NKD = y_sorted.index_select(0, row_M).view(N, K, -1)
        return torch.bmm(w_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1).to(x_ND.dtype)

    def sequence_aux_loss(self, scores_BTE, idx_BTK, alpha):
        """Complementary sequence-wise balance loss (V3 eq. 17-20); alpha is tiny (1e-4 in the paper).

        With seq_aux=false the whole batch counts as one sequence (V2's expert-level balance loss).
        """
        B, T, E = scores_BTE.shape
        K = idx_BTK.shape[-1]
        if not self.cfg.seq_aux:
            scores_BTE, idx_BTK, B, T = scores_BTE.reshape(1, B * T, E), idx_BTK.reshape(1, B * T, K), 1, B * T
        chosen_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, idx_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device))
        f_BE = chosen_BE * (E / (K * T))
        p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True).clamp_min(1e-20)).mean(dim=1)
        return alpha * (f_BE * p_BE).sum(-1).mean()
