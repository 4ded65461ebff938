"""The V3.2 indexer's training stages as `nanoseek train` options (DeepSeek-V3.2 report, section 2.1.1).

Starting from a V3 checkpoint converted with fresh indexers (`nanoseek convert --to v3.2`, then
`train.init_from`), `[dsa] stage` chooses what one run trains:
  * "warmup" (dense warm-up): attention stays dense; every parameter but the indexers' is frozen, and the
    loss is the indexer KL alone (nanoseek.model.dsa: the KL between the main attention distribution,
    summed over heads and L1-normalised, and the indexer's softmax). The routing biases do not move.
  * "sparse" (sparse training): top-k attention; the language-model losses train the model, the KL over
    the selected tokens trains the indexers (their inputs are detached, so neither loss reaches the other's
    parameters): loss = LM loss (+ MTP, balance) + kl_weight * KL.
Both log `indexer_kl` (the mean over layers of the per-query KL) beside the usual metrics; checkpoints and
resume are those of any run (the stage is a pure function of the config, so a resumed run is exact).
"""

from __future__ import annotations

import torch

from nanoseek.config import ConfigError
from nanoseek.model import Transformer
from nanoseek.model.dsa import indexer_kl_loss, set_train_stage
from nanoseek.train.config import DSAConfig

STAGES = ("off", "warmup", "sparse")
_MODEL_STAGE = {"warmup": "dense", "sparse": "sparse"}  # nanoseek.model.dsa.TRAIN_STAGES


def apply_stage(model: Transformer, cfg: DSAConfig) -> int:
    """Set the model's SparseMLA modules to the stage and, for the warm-up, freeze all but the indexers.
    Call before the optimizer is built (it takes the parameters that require grad). Returns the number of
    trained parameters."""
    if cfg.stage == "off":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not model.config.is_dsa:
        raise ConfigError(f"dsa.stage = {cfg.stage!r} needs a V3.2 (deepseek_v32) model")
    set_train_stage(model, _MODEL_STAGE[cfg.stage])
    if cfg.stage == "warmup":
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stage_loss(model: torch.nn.Module, lm_loss: torch.Tensor, cfg: DSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, indexer_kl) after a training forward whose LM-side loss is lm_loss."""
    kl = indexer_kl_loss(model)
    if cfg.stage == "warmup":
        return kl, kl
    return lm_loss + cfg.kl_weight * kl, kl
