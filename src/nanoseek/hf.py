"""Hugging Face `deepseek_v3` / `deepseek_v32` checkpoint directories: load and save (the package's public
contract), in the on-disk layout DeepSeek publishes (https://github.com/deepseek-ai/DeepSeek-V3/blob/main/README_WEIGHTS.md).

One key map, used in both directions: our module names are the HF names without the `model.` prefix,
except that routed experts are stacked ([E, 2F, D] gate|up and [E, D, F] down) and MTP modules live at
`model.layers.{num_hidden_layers + k}`. V3.2's indexer weights (`self_attn.indexer.{wq_b, wk, k_norm,
weights_proj}`) have the same names in transformers' layout and in DeepSeek's published checkpoint (there
wq_b and wk are FP8 with a weight_scale_inv, weights_proj BF16, k_norm FP32 with a bias), so they need no
entry of their own; the MTP layer carries an indexer too. Loading is self-checking: every tensor of the
checkpoint must land in exactly one place with the right shape, and every parameter must be filled;
anything else is a CheckpointError that names the tensor. Weights are copied shard by shard into a model whose storage is
allocated once (built on the meta device), so peak memory is one model plus one tensor.

FP8 checkpoints (float8_e4m3fn `weight` + fp32 `weight_scale_inv` per 128x128 block) are dequantised in
plain torch on the fly.

transformers' deepseek_v32 always rotates MLA's rope interleaved (it has no `rope_interleave`), so a V3.2
model with half-split MLA rope is saved with its rope rows of q_b_proj and kv_a_proj_with_mqa reordered to
the interleaved layout (the same function: rope pairs dims (i, i + R/2) one way, (2i, 2i + 1) the other).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .errors import CheckpointError  # noqa: F401 (re-exported: callers import it from here)
from .hf_keys import hf_to_ours, ours_to_hf  # noqa: F401 (re-exported: the key map)
from .model_dir import RUN_MODEL_DIRS, check_model_dir, read_config_json  # noqa: F401 (re-exported)
from .model import Transformer
from .model.layers import rope_inv_freq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
_EXPERT_RE = re.compile(r"^(layers\.\d+|mtp\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------- loading
def _checkpoint_files(path: Path) -> dict[str, str]:
    """tensor name -> file name, from the index or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for f in sorted(set(weight_map.values())):
            if not (path / f).exists():
                raise CheckpointError(f"{path / f}: shard listed in model.safetensors.index.json is missing")
        return weight_map
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with _open(single) as f:
        return {k: "model.safetensors" for k in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    out_f, in_f = w.shape
    bo, bi = block
    expect = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != expect:
        raise CheckpointError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} "
                              f"for a {tuple(w.shape)} weight with {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return w.float() * s


def _source_dtype(cfg_dict: dict, weight_map: dict[str, str], path: Path) -> torch.dtype:
    name = cfg_dict.get("torch_dtype") or cfg_dict.get("dtype")
    if isinstance(name, str) and hasattr(torch, name) and name != "float8_e4m3fn":
        return getattr(torch, name)
    key = "model.embed_tokens.weight"
    if key in weight_map:
        with _open(path / weight_map[key]) as f:
            dt = f.get_slice(key).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dt, torch.bfloat16)
    return torch.float32


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The float dtype a checkpoint's weights load in as stored (FP8: the dtype they dequantise to); None for
    a `nanoseek quantize` checkpoint, whose narrow weights are a format of their own."""
    cfg_dict, _ = read_config(path := Path(path))
    return None if stored_weight_format(cfg_dict) else _source_dtype(cfg_dict, _checkpoint_files(path), path)


def stored_weight_format(cfg_dict: dict) -> tuple[str, int | None] | None:
    """(format, group size) of a checkpoint `nanoseek quantize` wrote (bf16, int8 or int4 weights), else None."""
    q = cfg_dict.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "nanoseek":
        return None
    from .infer.quant import FORMATS

    fmt, group = q.get("weight_format"), q.get("group_size")
    if fmt not in FORMATS or not (group is None or (isinstance(group, int) and group > 0)):
        raise CheckpointError(f"config.json: quantization_config {q} is not a nanoseek weight format "
                              "(weight_format int8 | int4 | bf16, group_size a positive int or null)")
    return fmt, group


def read_config(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """(config.json as a dict, the ModelConfig it describes) of a model directory; errors name the file."""
    path = check_model_dir(path)
    cfg_dict = read_config_json(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return cfg_dict, ModelConfig.from_hf(cfg_dict)
        except ConfigError as e:
            if e.path is None:
                e.path = path / "config.json"
            raise


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         weights: str | None = None) -> Transformer:
    """Load a HF deepseek_v3 or deepseek_v32 directory into a Transformer (eval mode). See the module docstring.

    `weights` is the storage format of the linear and expert weights (nanoseek.infer.quant): None keeps
    the checkpoint's (dense, or the bf16 / int8 / int4 of a `nanoseek quantize` output); "bf16", "int8" or
    "int4" converts tensor by tensor while filling (never holding the dense model); "dense" expands a
    quantized checkpoint to `dtype`.
    """
    path = check_model_dir(path)
    cfg_dict, cfg = read_config(path)
    weight_map = _checkpoint_files(path)
    L = cfg.num_hidden_layers
    n_mtp = len({int(m.group(1)) for k in weight_map if (m := re.match(r"^model\.layers\.(\d+)\.", k))
                 and int(m.group(1)) >= L})
    if n_mtp != cfg.num_nextn_predict_layers:
        if n_mtp == 0:
            warnings.warn(f"{path}: config has {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint has "
                          "none; loading without MTP", stacklevel=2)
        elif n_mtp > cfg.num_nextn_predict_layers:
            raise CheckpointError(f"{path}: checkpoint has {n_mtp} layers beyond num_hidden_layers={L} but "
                                  f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}")
        else:
            raise CheckpointError(f"{path}: config has {cfg.num_nextn_predict_layers} MTP layers, checkpoint {n_mtp}")
        cfg = cfg.replace(num_nextn_predict_layers=n_mtp)
    stored = stored_weight_format(cfg_dict)
    if stored is not None:
        cfg = cfg.replace(quantization_config=None)  # the model's config is that of the dense model
    from .infer.quant import FORMATS

    if weights not in (None, "dense", *FORMATS):
        raise CheckpointError(f"weights={weights!r}: choose None (as stored), 'dense', 'bf16', 'int8' or 'int4'")
    fmt = stored[0] if weights is None and stored else None if weights in (None, "dense") else weights
    dtype = dtype or (torch.float32 if stored else _source_dtype(cfg_dict, weight_map, path))
    if cfg.quantization_config and dtype == torch.float8_e4m3fn:
        raise CheckpointError("dtype=float8 is not a compute dtype; FP8 weights are dequantised to the chosen dtype")

    with torch.device("meta"):
        model = Transformer(cfg)
    model.cast(dtype)
    if fmt is not None:
        from .infer.quant import default_group, quantize_model

        group = (stored[1] or 0) if stored and stored[0] == fmt else default_group(fmt)
        try:
            quantize_model(model, fmt, group)
        except ValueError as e:  # a layer the format cannot hold (int4, odd inputs), a bad group size
            raise CheckpointError(f"{path}: {e}") from None
    # model.to_empty(device), without torch.empty_like on meta tensors (its Python meta kernel imports sympy:
    # seconds at every start)
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    if cfg.tie_word_embeddings:  # every module got its own new tensor: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    _fill(model, path, weight_map, cfg, stored[0] if stored else None)
    inv_freq, _ = rope_inv_freq(cfg)
    model.rotary.inv_freq = inv_freq.to(device)  # non-persistent buffers are not in the checkpoint
    model.reset_load()
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        model.tokenizer_dir = str(path)
    model.eval()
    return model


def _fill(model: Transformer, path: Path, weight_map: dict[str, str], cfg: ModelConfig,
          stored_fmt: str | None = None) -> None:
    """Copy every checkpoint tensor into its place, shard by shard; fail on a stray, misshapen or missing one.

    int8 / int4 weights come with a `weight_scale` tensor: copied beside a destination of the same format,
    or used to expand the weight. A tensor bound for an int8 / int4 destination of another format is
    quantized on the way."""
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    todo = _parts_to_fill(params)
    # The narrow weights of a model loaded in its checkpoint's own format: each must be stored so.
    fmt = (getattr(model, "weight_format", None) or {}).get("format")
    as_stored: set[str] = set()
    from .infer.quant import STORAGE, format_of, narrow_weight_names

    if stored_fmt is not None and fmt == stored_fmt:
        as_stored = narrow_weight_names(model)
    block = tuple((cfg.quantization_config or {}).get("weight_block_size") or (128, 128))
    by_file: dict[str, list[str]] = {}
    for k, f in weight_map.items():
        by_file.setdefault(f, []).append(k)
    for fname in sorted(by_file):
        with _open(path / fname) as fh:
            for key in sorted(by_file[fname]):
                if key.endswith(("weight_scale_inv", "weight_scale")):
                    continue  # read with its weight
                name = hf_to_ours(key, cfg.num_hidden_layers)
                if cfg.tie_word_embeddings and name == "lm_head.weight" and "model.embed_tokens.weight" in weight_map:
                    name = None  # tied: some writers store the head too; the embedding is the one we keep
                t = _read(fh, key, path, fname, weight_map, block)
                if name is None:  # MTP copy of embedding/head: must match the shared tensor's shape
                    ref = model.embed_tokens.weight if key.endswith("embed_tokens.weight") else model.lm_head.weight
                    if _dense_shape(t) != _dense_shape(ref):  # either may be packed int4 (two inputs a byte)
                        raise CheckpointError(f"{key}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
                    continue
                target, dst, part = _destination(name, key, params, cfg)
                if target in as_stored and t.dtype != STORAGE[stored_fmt]:
                    raise CheckpointError(f"{key}: {t.dtype} in a checkpoint whose config.json says {stored_fmt} "
                                          "weights (a mismatched or partly overwritten quantized checkpoint)")
                if format_of(t.dtype) or format_of(dst.dtype):  # int8 / packed int4: a `_scale` beside each
                    t = _scaled_pair(t, key, name, target, part, dst, params, todo, fh, path, fname, weight_map, cfg)
                if tuple(t.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{key}: shape {tuple(t.shape)} does not match the config's "
                                          f"{tuple(dst.shape)}")
                with torch.no_grad():
                    dst.copy_(t)
                if part == "fused":
                    todo[target] = set()
                else:
                    todo[target].discard(part)
    _check_complete(todo, params, path, cfg)


def _dense_shape(t: torch.Tensor) -> tuple[int, ...]:
    return (*t.shape[:-1], 2 * t.shape[-1]) if t.dtype == torch.uint8 else tuple(t.shape)


def _scaled_pair(t, key, name, target, part, dst, params, todo, fh, path, fname, weight_map, cfg) -> torch.Tensor:
    """The tensor to copy into dst for an int8 / int4 checkpoint weight or destination; fills the scale."""
    from .infer.quant import dequantize, format_of, quantize

    skey = key + "_scale"
    scale, stored = None, format_of(t.dtype)
    if stored is not None:
        scale = _companion(fh, key, skey, path, fname, weight_map, stored)
        inputs = t.shape[-1] * (2 if stored == "int4" else 1)
        if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != t.shape[0] or \
                scale.shape[1] == 0 or inputs % scale.shape[1] or (stored == "int4" and inputs // scale.shape[1] % 2):
            raise CheckpointError(f"{skey}: {scale.dtype} {tuple(scale.shape)} is not an fp32 [rows, groups] scale "
                                  f"for the {tuple(t.shape)} {stored} weight")
    if format_of(dst.dtype) is None:  # a quantized checkpoint loaded dense or as bf16
        return t if scale is None else dequantize(t, scale, dst.dtype)
    _, sdst, spart = _destination(name, key, {target: params[target + "_scale"]}, cfg)
    if t.dtype != dst.dtype:  # dense, or the other scaled format: quantized now, one tensor at a time
        t = t if scale is None else dequantize(t, scale)
        t, scale = quantize(t, format_of(dst.dtype), t.shape[-1] // sdst.shape[-1])
    if tuple(scale.shape) != tuple(sdst.shape):
        raise CheckpointError(f"{skey}: shape {tuple(scale.shape)}, expected {tuple(sdst.shape)} (the group size "
                              "in config.json does not match the scales)")
    with torch.no_grad():
        sdst.copy_(scale)
    stodo = todo[target + "_scale"]
    if spart == "fused":
        stodo.clear()
    else:
        stodo.discard(spart)
    return t


def _parts_to_fill(params: dict[str, torch.Tensor]) -> dict[str, set]:
    """name -> the parts still missing: {None} for a whole tensor, (expert, projection) for stacked experts."""
    todo: dict[str, set] = {n: {None} for n in params}
    for n, p in params.items():
        if n.endswith(("experts.gate_up_proj", "experts.gate_up_proj_scale")):
            todo[n] = {(e, w) for e in range(p.shape[0]) for w in ("gate_proj", "up_proj")}
        elif n.endswith(("experts.down_proj", "experts.down_proj_scale")):
            todo[n] = {(e, "down_proj") for e in range(p.shape[0])}
    return todo


def _read(fh, key: str, path: Path, fname: str, weight_map: dict[str, str], block: tuple[int, int]) -> torch.Tensor:
    """One tensor of an open shard; an FP8 weight comes back dequantised with its scale (from any shard)."""
    try:
        t = fh.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path / fname}: cannot read tensor {key!r} ({e})") from None
    if t.dtype != torch.float8_e4m3fn:
        return t
    skey = key[: -len("weight")] + "weight_scale_inv"
    return _dequant_fp8(t, _companion(fh, key, skey, path, fname, weight_map, "FP8"), block, key)


def _companion(fh, key: str, skey: str, path: Path, fname: str, weight_map: dict[str, str], kind: str) -> torch.Tensor:
    """The scale tensor `skey` of the quantized weight `key`, from the open shard or the one holding it."""
    if skey not in weight_map:
        raise CheckpointError(f"{key}: {kind} weight without {skey}")
    if weight_map[skey] == fname:
        return fh.get_tensor(skey)
    with _open(path / weight_map[skey]) as fs:
        return fs.get_tensor(skey)


def _destination(name: str, key: str, params: dict[str, torch.Tensor],
                 cfg: ModelConfig) -> tuple[str, torch.Tensor, object]:
    """(our tensor's name, the view to copy into, the part it fills) for the HF tensor `key` (ours: `name`).

    A per-expert HF weight fills one slice of our stacked [E, 2F, D] gate|up or [E, D, F] down tensor;
    transformers' in-memory fused layout fills the whole stack at once ("fused")."""
    m = _EXPERT_RE.match(name)
    if m:
        prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.mlp.experts.{'down_proj' if which == 'down_proj' else 'gate_up_proj'}"
        if target not in params or e >= params[target].shape[0]:
            raise CheckpointError(f"unexpected tensor {key!r} (no such expert in the config)")
        dst = params[target][e]
        if which == "gate_proj":
            dst = dst[: cfg.moe_intermediate_size]
        elif which == "up_proj":
            dst = dst[cfg.moe_intermediate_size:]
        return target, dst, (e, which)
    if name not in params:
        hint = (" (a V3.2 indexer weight: its config.json should say model_type deepseek_v32)"
                if ".indexer." in key and not cfg.is_dsa else "")
        raise CheckpointError(f"unexpected tensor {key!r}: the config has no such weight{hint}")
    fused = name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")
    return name, params[name], "fused" if fused else None


def _check_complete(todo: dict[str, set], params: dict[str, torch.Tensor], path: Path, cfg: ModelConfig) -> None:
    missing = sorted(n for n, parts in todo.items() if parts)
    # Checkpoints without aux-loss-free balancing (V2) have no correction bias: it is zero.
    for n in [n for n in missing if n.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc"]:
        params[n].zero_()
        missing.remove(n)
    if missing:
        shown = ", ".join(ours_to_hf(n, cfg.num_hidden_layers) for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {shown}{more}")


# ----------------------------------------------------------------------------- saving
def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """Yields (hf_name, tensor) for every tensor of the HF layout that `state` (our names; the whole model or
    one pipeline stage's part) holds, experts split one by one."""
    L, Fh = cfg.num_hidden_layers, cfg.moe_intermediate_size
    relayout = cfg.is_dsa and not cfg.rope_interleave  # see the module docstring
    for name, t in state.items():
        if relayout:
            t = interleave_rope_rows(name, t, cfg)
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc":
            continue  # only aux-loss-free (V3) checkpoints carry the balancing bias
        if name.endswith("experts.gate_up_proj"):
            base = ours_to_hf(name[: -len("gate_up_proj")], L)
            for e in range(t.shape[0]):
                yield f"{base}{e}.gate_proj.weight", t[e, :Fh]
                yield f"{base}{e}.up_proj.weight", t[e, Fh:]
        elif name.endswith("experts.down_proj"):
            base = ours_to_hf(name[: -len("down_proj")], L)
            for e in range(t.shape[0]):
                yield f"{base}{e}.down_proj.weight", t[e]
        else:
            yield ours_to_hf(name, L), t
    for k in range(cfg.num_nextn_predict_layers):  # the published layout gives each MTP layer its own copies
        if "embed_tokens.weight" in state:
            yield f"model.layers.{L + k}.embed_tokens.weight", state["embed_tokens.weight"]
        if "lm_head.weight" in state:
            yield f"model.layers.{L + k}.shared_head.head.weight", state["lm_head.weight"]


def write_config(cfg: ModelConfig, dtype: torch.dtype, path: Path) -> None:
    """config.json (dequantised weights: no quantization_config) and generation_config.json."""
    if cfg.is_dsa and not cfg.rope_interleave:  # the rope rows are re-laid interleaved (hf_tensors)
        cfg = cfg.replace(rope_interleave=True)
    hf_cfg = cfg.to_hf(dtype=str(dtype).removeprefix("torch."))
    hf_cfg.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_index(path: Path) -> None:
    """model.safetensors.index.json for the model-*-of-*.safetensors shards in `path` (read from their headers)."""
    weight_map, total = {}, 0
    for f in sorted(path.glob("model-*-of-*.safetensors")):
        with _open(f) as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES[sl.get_dtype()]
                weight_map[k] = f.name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "F8_E4M3": 1, "U8": 1, "I8": 1,
                "BOOL": 1}


def copy_tokenizer(src: str | os.PathLike | None, path: Path) -> None:
    if src and Path(src).resolve() != path.resolve():
        for f in TOKENIZER_FILES:
            if f != "generation_config.json" and (Path(src) / f).exists():
                shutil.copy2(Path(src) / f, path / f)


def interleave_rope_rows(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Reorder the rope output rows of q_b_proj / kv_a_proj_with_mqa from the half-split to the interleaved
    layout (other tensors are returned as they are): an interleaved reader then rotates the same pairs."""
    R, N, C = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    half = torch.arange(R // 2)
    perm = torch.stack([half, half + R // 2], dim=1).flatten()  # 0, R/2, 1, R/2 + 1, ...
    if name.endswith("self_attn.q_b_proj.weight"):
        w = t.view(cfg.num_attention_heads, N + R, t.shape[-1])
        return torch.cat([w[:, :N], w[:, N:][:, perm]], dim=1).view_as(t)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat([t[:C], t[C:][perm]], dim=0)
    return t


def save(model: Transformer, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
         max_shard_bytes: int = 4 * 1024**3) -> Path:
    """Write a HF deepseek_v3 (or, with DSA, deepseek_v32) directory (config, safetensors shards + index,
    tokenizer files)."""
    if getattr(model, "weight_format", None) is not None:
        raise CheckpointError(f"this model has {model.weight_format['format']} weights (nanoseek.infer.quant): "
                              "save the dense model, and write quantized copies with `nanoseek quantize`")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if cfg.is_dsa and (cfg.scoring_func, cfg.topk_method) != ("sigmoid", "noaux_tc"):
        warnings.warn(f"{cfg.scoring_func}/{cfg.topk_method} routing: transformers' deepseek_v32 routes every "
                      "V3.2 checkpoint with sigmoid/noaux_tc, so only nanoseek and DeepSeek's reference code read "
                      "this one right", stacklevel=2)
    write_config(cfg, model.embed_tokens.weight.dtype, path)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_tensors(model.state_dict(), cfg):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in shards[0].items()},
                  str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: v.detach().contiguous().cpu().clone() for k, v in shard.items()}
            save_file(tensors, str(path / fname), metadata=meta)
            total += sum(v.numel() * v.element_size() for v in tensors.values())
            weight_map.update({k: fname for k in tensors})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    copy_tokenizer(tokenizer_dir or getattr(model, "tokenizer_dir", None), path)
    return path
