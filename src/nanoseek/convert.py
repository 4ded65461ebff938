"""`nanoseek convert --model DIR --to v3.2 --out DIR`: a DeepSeek-V3 checkpoint plus freshly initialised V3.2
lightning indexers, the starting point of the V3.2 report's continued training (arXiv 2512.02556 section
2.1.1: a dense warm-up that trains only the indexers, then sparse training).

The conversion streams tensor by tensor (peak memory: one shard): every source tensor is written as it is
(FP8 weights and their scales included), and one more shard holds the new indexers of every layer and
MTP layer, initialised as transformers initialises DeepseekV32Indexer: the linear weights wq_b, wk and
weights_proj ~ N(0, initializer_range), the k_norm LayerNorm weight 1 and bias 0. Their dtype is the
checkpoint's; in an FP8 checkpoint wq_b and wk are stored FP8 with a 128x128 weight_scale_inv and
weights_proj in BF16, k_norm in FP32, as in DeepSeek's published V3.2 files.

Until the indexers are trained the model is not the V3 model: it attends to index_topk tokens chosen by a
random indexer. With index_topk >= the sequence length every token is selected and the logits are the V3
logits exactly. A half-split-rope source has its rope rows re-laid interleaved (transformers' deepseek_v32
knows no other layout; see nanoseek.hf). The output is written beside --out and renamed into place at the
end, so an interrupted conversion leaves nothing half-written there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .hf import TOKENIZER_FILES, CheckpointError, _checkpoint_files, _open, interleave_rope_rows

TARGETS = ("v3.2",)


def _indexer_tensors(cfg: ModelConfig, layer: int, gen: torch.Generator, dtype: torch.dtype, fp8: bool):
    """Fresh indexer tensors of one layer, HF names -> tensors (in a fixed order: same seed, same weights)."""
    I, E, D, std = cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size, cfg.initializer_range
    pre = f"model.layers.{layer}.self_attn.indexer."
    out = {}
    for name, shape in (("wq_b", (I * E, cfg.q_lora_rank)), ("wk", (E, D)), ("weights_proj", (I, D))):
        w = torch.randn(shape, generator=gen) * std
        if fp8 and name != "weights_proj":
            from .train.fp8 import quantize_blocks

            q, scale = quantize_blocks(w, 128)
            out[pre + name + ".weight"], out[pre + name + ".weight_scale_inv"] = q.contiguous(), scale
        else:
            out[pre + name + ".weight"] = w.to(torch.bfloat16 if fp8 else dtype)
    norm_dtype = torch.float32 if fp8 else dtype
    out[pre + "k_norm.weight"] = torch.ones(E, dtype=norm_dtype)
    out[pre + "k_norm.bias"] = torch.zeros(E, dtype=norm_dtype)
    return out


def convert_to_v32(src: str | Path, out: str | Path, index_topk: int = 2048, index_n_heads: int = 64,
                   index_head_dim: int = 128, seed: int = 0) -> Path:
    """Write a deepseek_v32 directory at `out` from the deepseek_v3 one at `src`; returns `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: not a model directory (no config.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keys we do not use are carried over by to_hf's canonical form
        cfg = ModelConfig.from_json(src / "config.json")
    if cfg.is_dsa:
        raise ConfigError(f"{src}: already a V3.2 (deepseek_v32) checkpoint")
    try:
        new = cfg.replace(index_topk=index_topk, index_n_heads=index_n_heads, index_head_dim=index_head_dim)
    except ConfigError as e:
        raise ConfigError(f"{src}: cannot add DeepSeek Sparse Attention: {e}") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty directory")
    if out.resolve() == src.resolve():
        raise CheckpointError("--out must differ from --model")
    weight_map = _checkpoint_files(src)
    fp8 = any(k.endswith("weight_scale_inv") for k in weight_map)
    relayout = not cfg.rope_interleave
    if relayout and fp8:
        raise CheckpointError(f"{src}: an FP8 checkpoint with half-split rope; load and save it in bf16 first "
                              "(its rope rows must be re-laid for deepseek_v32)")
    src_dict = json.loads((src / "config.json").read_text())
    named = src_dict.get("torch_dtype") or src_dict.get("dtype")
    dtype = getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else torch.bfloat16
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
        dtype = torch.bfloat16  # FP8 files compute in bf16
    layers = sorted({int(m.group(1)) for k in weight_map if (m := re.match(r"^model\.layers\.(\d+)\.self_attn\.", k))})
    missing = [i for i in range(cfg.num_hidden_layers) if i not in layers]
    if missing:
        raise CheckpointError(f"{src}: no attention weights for layer(s) {missing[:8]}")
    if any(".indexer." in k for k in weight_map):
        raise CheckpointError(f"{src}: has indexer weights but its config says {cfg.model_type}")

    tmp = out.with_name(out.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    by_file: dict[str, list[str]] = {}
    for k, f in weight_map.items():
        by_file.setdefault(f, []).append(k)
    n_shards = len(by_file) + 1
    names = [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    new_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(sorted(by_file), names):
        with _open(src / fname) as fh:
            tensors = {}
            for key in sorted(by_file[fname]):
                try:
                    t = fh.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{src / fname}: cannot read tensor {key!r} ({e})") from None
                tensors[key] = interleave_rope_rows(key, t, cfg).contiguous() if relayout else t
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        new_map.update(dict.fromkeys(tensors, shard))
        del tensors
    gen = torch.Generator().manual_seed(seed)
    indexers = {}
    for layer in layers:  # the main layers and any MTP layers (V3.2's MTP layer has an indexer too)
        indexers.update(_indexer_tensors(new, layer, gen, dtype, fp8))
    save_file(indexers, str(tmp / names[-1]), metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in indexers.values())
    new_map.update(dict.fromkeys(indexers, names[-1]))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_cfg = (new.replace(rope_interleave=True) if relayout else new).to_hf(dtype=str(dtype).removeprefix("torch."))
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="source checkpoint directory (HF deepseek_v3 layout)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target architecture: v3.2 adds DSA indexers")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--index-topk", type=int, default=2048, help="tokens each query keeps (default 2048, as released)")
    p.add_argument("--index-n-heads", type=int, default=64, help="indexer heads (default 64)")
    p.add_argument("--index-head-dim", type=int, default=128, help="indexer head size (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the indexers' initialisation (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_to_v32(args.model, args.out, args.index_topk, args.index_n_heads, args.index_head_dim, args.seed)
    except (ConfigError, CheckpointError) as e:
        print(f"nanoseek convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (deepseek_v32: index_topk {args.index_topk}, {args.index_n_heads} indexer heads x "
          f"{args.index_head_dim})")
    return 0
