"""`nanoseek quantize`: write a checkpoint with bf16, int8 or int4 weights, tensor by tensor, never holding the model.

The output is a HF `deepseek_v3` directory that nanoseek.load (and so `generate`, `chat`, `serve`) uses
directly:
  * `config.json` is the source's plus `"quantization_config": {"quant_method": "nanoseek",
    "weight_format": "int8" | "int4" | "bf16", "group_size": 128 | 32 | null, "modules_not_converted": [...]}`;
  * sharded safetensors (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`), the
    tensor names of the source. Each linear and routed-expert weight that nanoseek.infer.quant converts
    is stored as int8 [out, in] or packed int4 (uint8 [out, in / 2], two 4-bit weights a byte), each with
    an fp32 `<name>_scale` [out, in / group_size] beside it (w ~ q * scale per group of inputs, the whole
    row when group_size does not divide it), or as bf16. Everything else
    (embedding, norms, router, kv_b_proj) is copied in its source dtype; FP8 source weights are
    dequantised first.
  * the tokenizer files and generation_config.json, copied.
transformers does not know this quant_method and refuses the directory: share the source checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.hf import (_EXPERT_RE, TOKENIZER_FILES, CheckpointError, _checkpoint_files, _open, _read, hf_to_ours,
                         read_config, stored_weight_format, write_index)
from nanoseek.model import Transformer

from .quant import (DEFAULT_GROUPS, NOT_QUANTIZED, SCALED, check_format, default_group, narrow, narrow_weight_names,
                    quantize_model)


def _plan(cfg: ModelConfig, fmt: str, group_size: int | None) -> set[str]:
    """Our names of the weights that become narrow (from a model built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return narrow_weight_names(quantize_model(model, fmt, group_size))


def _target(key: str, cfg: ModelConfig) -> str | None:
    """The name in our model whose format this HF tensor takes (stacked experts: the stack)."""
    L = cfg.num_hidden_layers
    if key.endswith("shared_head.head.weight"):  # an MTP layer's copy of the head: the head's format
        return "lm_head.weight"
    name = hf_to_ours(key, L)
    if name is None:
        return None
    m = _EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}.mlp.experts.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}"
    return name


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, group_size: int | None = None,
                        max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `src` with `fmt` weights to `out` (see the module docstring); returns out. group_size None:
    the format's default. Peak memory: one output shard plus one source tensor."""
    src, out = Path(src), Path(out)
    if check_format(fmt) not in SCALED and group_size is not None:
        raise ValueError(f"{fmt} weights have no scales: a group size is for int8 and int4")
    group_size = default_group(fmt) if group_size is None else group_size
    if group_size is not None and group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0: one scale per row), got {group_size}")
    if fmt == "int4" and group_size % 2:
        raise ValueError(f"int4 groups must be an even number of inputs so each starts on a byte, got {group_size}")
    cfg_dict, cfg = read_config(src)
    if stored_weight_format(cfg_dict) is not None:
        raise CheckpointError(f"{src}: already a nanoseek {stored_weight_format(cfg_dict)[0]} checkpoint; "
                              "quantize the original")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output must not be the source directory")
    weight_map = _checkpoint_files(src)
    plan = _plan(cfg, fmt, group_size)  # a layer the format cannot hold (int4: odd inputs) is a ValueError
    block = tuple((cfg.quantization_config or {}).get("weight_block_size") or (128, 128))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()

    by_file: dict[str, list[str]] = {}
    for k, f in weight_map.items():
        if not k.endswith("weight_scale_inv"):  # FP8 scales are read with their weights
            by_file.setdefault(f, []).append(k)
    shard: dict[str, torch.Tensor] = {}
    size, n_shards = 0, 0

    def flush():
        nonlocal shard, size, n_shards
        if shard:
            n_shards += 1
            save_file(shard, str(out / f"part-{n_shards:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for fname in sorted(by_file):
        with _open(src / fname) as fh:
            for key in sorted(by_file[fname]):
                t = _read(fh, key, src, fname, weight_map, block)
                pieces = {key: t}
                if _target(key, cfg) in plan:
                    w, s = narrow(t, fmt, group_size)
                    pieces = {key: w} if s is None else {key: w, key + "_scale": s}
                for k, v in pieces.items():
                    nbytes = v.numel() * v.element_size()
                    if shard and size + nbytes > max_shard_bytes:
                        flush()
                    shard[k] = v.contiguous()
                    size += nbytes
    flush()
    for i in range(1, n_shards + 1):
        (out / f"part-{i:05d}.safetensors").rename(out / f"model-{i:05d}-of-{n_shards:05d}.safetensors")
    write_index(out)

    cfg_out = dict(cfg_dict)
    cfg_out["quantization_config"] = {
        "quant_method": "nanoseek", "weight_format": fmt, "group_size": (group_size or None) if fmt in SCALED else None,
        "modules_not_converted": ["embed_tokens", "mlp.gate", "*norm", *NOT_QUANTIZED]
        + (["lm_head"] if cfg.tie_word_embeddings else [])}
    (out / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    return out


# ----------------------------------------------------------------------------- `nanoseek quantize`
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="source model directory (HF deepseek_v3: fp32, bf16 or FP8)")
    p.add_argument("--to", required=True, choices=["int8", "int4", "bf16"], help="weight format to write")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-size", type=int, default=None,
                   help="int8 / int4: inputs per scale (default " + ", ".join(f"{g} for {f}" for f, g in
                   DEFAULT_GROUPS.items()) + "; 0 = one scale per output row; int4: even)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size (default 2 GB)")


def run(args: argparse.Namespace) -> int:
    try:
        out = quantize_checkpoint(args.model, args.out, args.to, args.group_size,
                                  max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"wrote {out} ({args.to} weights, {total / 1e9:.2f} GB)")
    return 0
