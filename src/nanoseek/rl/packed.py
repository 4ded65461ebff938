"""GRPO's per-token log-probabilities with each group's prompt computed once and no padding.

A GRPO step scores B = P x G rows, and the G rows of a group share their prompt. The plain way
(nanoseek.rl.trainer.completion_log_probs on a right-padded [B, T] batch) runs every row's prompt
through the model G times and every padded position as well. Here the tokens the model must see are
packed into one list without repeats or padding:

    each group's prompt tokens once, then each row's completion tokens but its last one (the last is only
    a target: nothing is predicted from it),

and every position-wise part of a block (the norms, the MLA projections, o_proj, the dense MLP or the
MoE with its router) runs on that packed list [N, D]. Only the attention core works on padded layouts,
gathered from the packed rows: a group's prompt attends causally to itself ([P, Tp]), and a completion
token attends to its group's prompt (gathered, not recomputed) and causally to its own row ([B, Tc],
a boolean mask over [prompt keys | completion keys]). Rope angles come from each token's true position
in its own row (len(prompt) + t for completion token t). The head scores the same positions as
completion_log_probs: the prompt's last token (predicting the first completion token, a different
target in each row) and every completion input (predicting the next token).

This is the same function of the weights as the padded forward: the same tokens at the same positions
see the same keys, so log-probabilities and gradients agree to float rounding (summation order only;
tests/test_grpo_update.py compares both). What differs is the cost: the position-wise layers see
each distinct token once (benchmarks/bench_grpo_trl.py measures the step, README quotes it).
One thing is counted differently: each MoE layer's expert loads (MoE.load, read for max_vio) count a shared
prompt token once instead of G times.

Models whose blocks are not plain MLA decoder blocks (V3.2's sparse attention, whose indexer selects keys
per query over the padded row) are scored by the padded path instead (`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model.attention import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Block
from nanoseek.train.head import head_log_probs


def supports(model: torch.nn.Module) -> bool:
    """Whether packed_log_probs can score this model: embedding, rotary, plain MLA blocks, norm and head."""
    if not all(hasattr(model, a) for a in ("embed_tokens", "rotary", "layers", "norm", "lm_head")):
        return False
    return all(isinstance(b, Block) and isinstance(b.self_attn, MLA) and type(b.self_attn).forward is MLA.forward
               for b in model.layers)


@dataclass
class Packing:
    """Where every token of a GRPO batch lives in the packed list, and what is scored (all on one device).

    N packed tokens: the P group prompts first (prompt g's tokens at prompt_start[g] ..), then each row's
    completion inputs. Padded layouts index into the packed rows: prompt_index [P, Tp] and completion_index
    [B, Tc] (padding points at row 0 and is masked out or dropped); unpack_index [N] takes each packed token
    back from the flattened [P*Tp + B*Tc] layouts. score_index [S] are the packed rows the head scores,
    targets [S] their targets, and dest [S] where each lands in the flattened [B, T] output of
    nanoseek.rl.grpo.completion_batch.
    """

    ids: torch.Tensor             # [N] token ids
    positions: torch.Tensor       # [N] each token's position in its own row
    prompt_index: torch.Tensor    # [P, Tp]
    prompt_lens: torch.Tensor     # [P]
    completion_index: torch.Tensor  # [B, Tc]
    completion_lens: torch.Tensor   # [B] completion inputs per row (len(completion) - 1, at least 0)
    group: torch.Tensor           # [B] each row's prompt
    unpack_index: torch.Tensor    # [N]
    score_index: torch.Tensor     # [S]
    targets: torch.Tensor         # [S]
    dest: torch.Tensor            # [S] flat indices into [B, T]
    shape: tuple[int, int]        # (B, T) of the padded output

    @classmethod
    def of(cls, prompts: list[list[int]], completions: list[list[int]], device=None) -> "Packing":
        """Consecutive equal prompts form a group (the trainer lays each prompt's G rows out together)."""
        if len(prompts) != len(completions) or not prompts:
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every row needs a prompt of at least one token")
        groups: list[list[int]] = []
        group_of: list[int] = []
        for i, p in enumerate(prompts):
            if not groups or list(p) != list(prompts[i - 1]):
                groups.append(list(p))
            group_of.append(len(groups) - 1)
        P, B = len(groups), len(prompts)
        Tp = max(len(g) for g in groups)
        c_in = [list(c[:-1]) for c in completions]  # the last completion token is only a target
        Tc = max(1, max(len(c) for c in c_in))
        ids, pos = [], []
        prompt_index = torch.zeros(P, Tp, dtype=torch.long)
        unpack = []
        for g, p in enumerate(groups):
            prompt_index[g, : len(p)] = torch.arange(len(ids), len(ids) + len(p))
            unpack += [g * Tp + t for t in range(len(p))]
            ids += p
            pos += range(len(p))
        starts = [int(prompt_index[g, 0]) for g in range(P)]
        completion_index = torch.zeros(B, Tc, dtype=torch.long)
        for b, c in enumerate(c_in):
            completion_index[b, : len(c)] = torch.arange(len(ids), len(ids) + len(c))
            unpack += [P * Tp + b * Tc + t for t in range(len(c))]
            ids += c
            lp = len(groups[group_of[b]])
            pos += range(lp, lp + len(c))
        # Scored rows, in completion_batch's layout: row b's column len(p) - 1 + j scores completion token j.
        T = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
        score, targets, dest = [], [], []
        for b, (p, c) in enumerate(zip(prompts, completions)):
            if not c:
                continue
            g = group_of[b]
            score.append(starts[g] + len(p) - 1)
            score += completion_index[b, : len(c) - 1].tolist()
            targets += c
            dest += range(b * T + len(p) - 1, b * T + len(p) - 1 + len(c))

        def t(x, dtype=torch.long):
            return torch.as_tensor(x, dtype=dtype).to(device)

        return cls(t(ids), t(pos), prompt_index.to(device), t([len(g) for g in groups]), completion_index.to(device),
                   t([len(c) for c in c_in]), t(group_of), t(unpack), t(score), t(targets), t(dest), (B, T))



def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an index tensor of any shape, as one index_select (its backward is one index_add)."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def _attention(attn: MLA, h_N: torch.Tensor, cos_N: torch.Tensor, sin_N: torch.Tensor, pk: Packing,
               completion_mask: torch.Tensor) -> torch.Tensor:
    """MLA.forward for the packed tokens: projections on the packed rows, the attention core on the prompt
    and completion layouts, o_proj on the packed rows again. Returns [N, D]."""
    q_nope, q_rope, latent, k_rope = attn._project(h_N[None], cos_N[None], sin_N[None])
    q_nope, q_rope, latent, k_rope = q_nope[0], q_rope[0], latent[0], k_rope[0]  # [N, H, .], [N, C], [N, R]
    pi, ci = pk.prompt_index, pk.completion_index
    out_p = attn._naive(_rows(q_nope, pi), _rows(q_rope, pi), _rows(latent, pi), _rows(k_rope, pi))  # causal
    keys = torch.cat([pi[pk.group], ci], dim=1)  # [B, Tp + Tc]: the group's prompt, then the row's own tokens
    out_c = attn._naive(_rows(q_nope, ci), _rows(q_rope, ci), _rows(latent, keys), _rows(k_rope, keys),
                        completion_mask)
    H, V = attn.n_heads, attn.v_dim
    out = torch.cat([out_p.reshape(-1, H * V), out_c.reshape(-1, H * V)]).index_select(0, pk.unpack_index)
    return attn.o_proj(out.to(h_N.dtype))


def _completion_mask(pk: Packing) -> torch.Tensor:
    """[B, 1, Tc, Tp + Tc] bool: completion token t of row b sees its prompt's real tokens and its own
    tokens 0..t (a padded query sees itself at least, so no softmax row is empty)."""
    P, Tp = pk.prompt_index.shape
    B, Tc = pk.completion_index.shape
    dev = pk.ids.device
    prompt_ok = torch.arange(Tp, device=dev)[None, :] < pk.prompt_lens[pk.group][:, None]  # [B, Tp]
    causal = torch.ones(Tc, Tc, dtype=torch.bool, device=dev).tril()
    return torch.cat([prompt_ok[:, None, :].expand(B, Tc, Tp), causal[None].expand(B, Tc, Tc)], dim=2)[:, None]


def packed_log_probs(model: torch.nn.Module, pk: Packing) -> torch.Tensor:
    """log pi(target) in nanoseek.rl.grpo.completion_batch's [B, T] layout (0 off the completion positions),
    from one packed forward (see the module docstring). Differentiable in the model's weights."""
    cos_N, sin_N = model.rotary(pk.positions)
    x = model.embed_tokens(pk.ids)
    mask = _completion_mask(pk)
    for block in model.layers:
        x = x + _attention(block.self_attn, block.input_layernorm(x), cos_N, sin_N, pk, mask)
        h = block.post_attention_layernorm(x)
        y = block.mlp(h[None])[0][0] if isinstance(block.mlp, MoE) else block.mlp(h)
        x = x + y
    lp_S = head_log_probs(model.norm(x[pk.score_index]), model.lm_head.weight, pk.targets)
    B, T = pk.shape
    return lp_S.new_zeros(B * T).index_copy(0, pk.dest, lp_S).view(B, T)
