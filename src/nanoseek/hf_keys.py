"""The key map between our module names and a Hugging Face `deepseek_v3` / `deepseek_v32` checkpoint's tensor
names (nanoseek.hf uses it both ways): ours are the HF names without the `model.` prefix, except that MTP
modules live at `model.layers.{num_hidden_layers + k}` in HF's layout and share the embedding and head."""

from __future__ import annotations

import re

from .errors import CheckpointError


def hf_to_ours(key: str, n_layers: int) -> str | None:
    """HF name -> our name (None for the MTP copies of embedding/head, which we share with the main model)."""
    if key == "lm_head.weight":
        return key
    if not key.startswith("model."):
        raise CheckpointError(f"unexpected tensor {key!r}: not a deepseek_v3 / deepseek_v32 weight")
    key = key[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", key)
    if m and int(m.group(1)) >= n_layers:
        rest = m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        return f"mtp.{int(m.group(1)) - n_layers}.{rest}"
    return key


def ours_to_hf(name: str, n_layers: int) -> str:
    if name == "lm_head.weight":
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}"
    return "model." + name
