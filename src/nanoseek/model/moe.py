"""DeepSeekMoE: router, grouped routed experts, shared experts (V3 report section 2.1.2, V2 section 2.2).

Shape legend: N tokens, D hidden, E routed experts, K experts per token, F expert hidden size,
M = N*K token-expert assignments, G groups.

Router (V3 eq. 12-16): scores s = sigmoid(x W^T) (or softmax for V2 checkpoints). Selection uses s + b,
where b is the auxiliary-loss-free balancing bias; the gate values use s alone. With noaux_tc and
n_group > 1, a group's score is the sum of its top-2 (biased) scores and only the best topk_group groups
(nodes, in the paper) may be chosen; masked groups get -inf so they never win, even when every score is
negative. The weights are normalised when norm_topk_prob and then always scaled by routed_scaling_factor.

Experts are stacked weights ([E, 2F, D] and [E, D, F]), never a Python loop over experts. Training sorts
the tokens by expert and multiplies them in one grouped GEMM (torch grouped_mm). Inference of up to
KERNEL_ASSIGNMENTS (token, expert) pairs runs the C++ kernel of nanoseek.model.kernels (each chosen expert
read once for all its tokens); without it, GroupedExperts.forward_few (one GEMV pair per assignment, up to
FEW_ASSIGNMENTS) or one padded batched GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import kernels
from .layers import MLP, linear


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

    def use_grouped_mm(self, dtype: torch.dtype, cap: int) -> bool:
        """grouped_mm (no padding) or one padded bmm over [E, cap, D]?

        Measured on a 2-core CPU (bench config, fp32): grouped_mm wins for training (fwd+bwd 150 vs 206 ms
        per layer: no padding waste) and for one row per expert (decoding a single sequence: it reads only
        the chosen experts' weights), the padded bmm for mid-sized inference batches. bf16 always groups.
        """
        if not hasattr(F, "grouped_mm") or self.gate_up_proj.shape[2] % 8 or self.gate_up_proj.shape[1] % 16:
            return False  # grouped_mm needs 16-byte aligned strides
        if dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            return True
        return torch.is_grad_enabled() or cap <= 1

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MD holds the assignments sorted by expert; counts_E how many each expert got."""
        x_MD, w1, w2 = self._weights(x_MD)
        E, M = counts_E.shape[0], x_MD.shape[0]
        cap = int(counts_E.max())
        # An expert-parallel rank may receive no tokens: the padded path handles that, and keeps the (empty)
        # input in the autograd graph so the all-to-all backward still runs on every rank.
        if M > 0 and self.use_grouped_mm(x_MD.dtype, cap):
            return self._grouped(x_MD, counts_E, w1, w2)
        # Scatter each expert's rows into a [E, cap, D] buffer, run padded, gather back.
        expert_M = torch.repeat_interleave(torch.arange(E, device=x_MD.device), counts_E, output_size=M)
        row_M = expert_M * cap + torch.arange(M, device=x_MD.device) - (counts_E.cumsum(0) - counts_E)[expert_M]
        buf = x_MD.new_zeros(E * cap, x_MD.shape[1]).index_copy(0, row_M, x_MD)
        y_ECD = self.forward_padded(buf.view(E, cap, x_MD.shape[1]))
        return y_ECD.reshape(E * cap, y_ECD.shape[-1]).index_select(0, row_M)

    def forward_few(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Weighted expert output [N, D] for a handful of tokens (decoding): one GEMV pair per assignment.

        With N*K small, the sort/gather/grouped-GEMM machinery costs more than the arithmetic (measured on a
        2-core CPU, bench config, one token: 0.62 vs 0.80 ms per layer, the weights alone 0.55 ms). Each
        assignment reads its expert's weights in place; nothing is copied. The loop is over the N*K chosen
        (token, slot) pairs, so its length does not depend on the number of experts.
        """
        x_ND, w1, w2 = self._weights(x_ND)
        N, K = idx_NK.shape
        pairs = [(n, k, e) for n, row in enumerate(idx_NK.tolist()) for k, e in enumerate(row)]
        h = torch.cat([linear(x_ND[n: n + 1], w1[e]) for n, _, e in pairs])  # [N*K, 2F]
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g) * u
        y_NKD = torch.cat([linear(a[i: i + 1], w2[e]) for i, (_, _, e) in enumerate(pairs)]).view(N, K, -1)
        return torch.bmm(w_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1)

    @staticmethod
    def _grouped(x_MD, counts_E, w1, w2):
        offs = counts_E.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x_MD, w1.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(g) * u, w2.transpose(-2, -1), offs=offs)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """All experts at once on a [E, cap, D] buffer: two batched GEMMs."""
        x_ECD, w1, w2 = self._weights(x_ECD)
        h = torch.bmm(x_ECD, w1.transpose(1, 2))
        g, u = h.chunk(2, dim=-1)
        return torch.bmm(F.silu(g) * u, w2.transpose(1, 2))


class MoE(nn.Module):
    # Inference with at most this many (token, expert) assignments runs GroupedExperts.forward_few.
    FEW_ASSIGNMENTS = 32  # measured crossover on the bench config: 8 tokens x 4 experts
    # ... and at most this many run the C++ kernel (nanoseek.model.kernels) when it is available.
    KERNEL_ASSIGNMENTS = 4096  # measured on bench: faster than the torch paths up to 1024 tokens x 4

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        # Tokens routed to each expert, summed over forwards in training mode (read by the balancer).
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        # Expert parallelism replaces this with an all-to-all dispatch (nanoseek.train.parallel).
        self.dispatcher = None

    def forward(self, x_BTD: torch.Tensor, aux_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        w_NK, idx_NK, scores_NE = self.gate(x_ND)
        local_inference = self.dispatcher is None and not self.training and not torch.is_grad_enabled()
        if local_inference and idx_NK.numel() <= self.KERNEL_ASSIGNMENTS and kernels.usable(x_ND):
            ex = self.experts
            y_ND = kernels.experts_rows(x_ND, ex.gate_up_proj, ex.down_proj, idx_NK, w_NK)
        elif local_inference and idx_NK.numel() <= self.FEW_ASSIGNMENTS:
            y_ND = self.experts.forward_few(x_ND, w_NK, idx_NK).to(x_ND.dtype)
        else:
            counts_E = torch.bincount(idx_NK.flatten(), minlength=self.cfg.n_routed_experts)
            if self.training:
                self.load += counts_E.detach().float()
            if self.dispatcher is not None:
                y_ND = self.dispatcher(self, x_ND, w_NK, idx_NK)
            else:
                y_ND = self.route_local(x_ND, w_NK, idx_NK, counts_E)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        aux = None
        if self.training and aux_alpha > 0:
            aux = self.sequence_aux_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1), aux_alpha)
        return y_ND.view(B, T, D), aux

    def route_local(self, x_ND, w_NK, idx_NK, counts_E):
        """Routed-expert output [N, D] on this process.

        Each (token, k) assignment gets a row in an expert-sorted layout; tokens are gathered into it with
        index_select and results read back in token-major order, so the weighted sum over k is one batched
        GEMV and no scatter-add (slow and serial on CPU) appears in the forward or the backward.
        """
        N, K = idx_NK.shape
        E, M, dev = counts_E.shape[0], N * K, x_ND.device
        e_M = idx_NK.flatten()
        order_M = e_M.argsort(stable=True)
        cap = int(counts_E.max())
        if self.experts.use_grouped_mm(x_ND.dtype, cap):
            y_sorted = self.experts(x_ND.index_select(0, order_M // K), counts_E)
            row_M = torch.empty_like(order_M).index_copy_(0, order_M, torch.arange(M, device=dev))
            y_MD = y_sorted.index_select(0, row_M)
        else:
            e_sorted = e_M[order_M]
            rank_M = torch.arange(M, device=dev) - (counts_E.cumsum(0) - counts_E)[e_sorted]  # slot in expert
            row_M = torch.empty_like(order_M).index_copy_(0, order_M, e_sorted * cap + rank_M)
            src = torch.full((E * cap,), N, dtype=torch.long, device=dev).index_copy_(0, row_M, torch.arange(M, device=dev) // K)
            x_pad = F.pad(x_ND, (0, 0, 0, 1)).index_select(0, src)  # padding rows read an all-zero row
            y_pad = self.experts.forward_padded(x_pad.view(E, cap, -1)).reshape(E * cap, -1)
            y_MD = y_pad.index_select(0, row_M)
        y_NKD = y_MD.view(N, K, -1)
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
