"""`nanoseek.generate`: the one-call Python API over the batched engine (the package's public contract),
and the model loading of the generate, chat and serve commands (`check_model_dir` first, then `load_model`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nanoseek.hf import check_model_dir
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

__all__ = ["generate", "load_model", "check_model_dir"]


def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_token_ids: list[int] | None = None, seed: int | None = None,
             *, max_batch_size: int = 64, speculative: bool = False) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists); greedy when temperature is 0.

    Generation of a prompt ends after max_new_tokens tokens or after a token in stop_token_ids, which is
    kept at the end of its output (as transformers' generate keeps the EOS token). With a seed, prompt i
    samples with seed + i, so equal prompts in one call still get independent samples and the same call
    always returns the same tokens.
    """
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise TypeError("prompts must be a list of token-id lists (tokenize text first)")
    if not prompts:
        return []
    stops = list(stop_token_ids or [])
    params = [SamplingParams(max_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                             seed=None if seed is None else int(seed) + i, stop_token_ids=stops)
              for i in range(len(prompts))]
    max_len = max(len(p) for p in prompts) + int(max_new_tokens)
    engine = Engine(model, max_batch_size=min(len(prompts), max_batch_size),
                    max_len=min(max_len, model.config.max_position_embeddings), speculative=speculative)
    return [c.token_ids for c in engine.generate_batch([list(p) for p in prompts], params)]


# --dtype of generate / chat / serve -> (the compute dtype, the weight format nanoseek.load converts to)
LOAD_DTYPES = {"float32": (torch.float32, "dense"), "bfloat16": (torch.bfloat16, "dense"),
               "float16": (torch.float16, "dense"), "int8": (torch.float32, "int8"),
               "int4": (torch.float32, "int4"), "bf16-weights": (torch.float32, "bf16")}


def load_model(model_dir: str | Path, dtype: str | None = None, device: str | torch.device = "cpu",
               int8_activations: bool = False) -> torch.nn.Module:
    """nanoseek.load for the generate, chat and serve commands, with a line on stderr saying what was
    loaded, in which dtype and on which device.

    Without a dtype the weights keep their stored dtype, except on a CPU (decided from the checkpoint
    before loading, so no second copy is made): there bf16 weights (real DeepSeek checkpoints, dequantised
    FP8) load as `bf16-weights`: the linear and expert weights stay bf16, bit for bit, and everything
    computes in fp32 through the decode kernels, which widen bf16 in registers. That decodes faster than
    bf16 compute even where bf16 matmuls are fast (AVX512-BF16 / AMX: torch's bf16 path at a few rows is
    the slow part; the README's Zen 5 table) and than fp32 weights (half the bytes to read), in half
    fp32's memory. fp16 weights load as fp32 on a CPU without fast bf16 (nanoseek.device.cpu_has_fast_bf16),
    where half-precision matmuls take a slow scalar path. `--dtype bfloat16` keeps bf16 compute. A
    `nanoseek quantize` checkpoint keeps its int8 / int4 / bf16 weights. `int8`, `int4` and `bf16-weights`
    convert the linear and expert weights while loading (fp32 compute, nanoseek.infer.quant); a float
    dtype given for a quantized checkpoint expands it.

    int8_activations: int8 / int4 weights take int8 activations in the decode kernels (process-wide,
    nanoseek.infer.fast.kernels.set_int8_activations); an OptionError where the model has no int8 or int4
    weights, is not on a CPU, or the kernels are not available.
    """
    from nanoseek.device import cpu_has_fast_bf16
    from nanoseek.errors import OptionError
    from nanoseek.hf import load

    device = torch.device(device)
    if dtype is not None and dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(LOAD_DTYPES)}")
    torch_dtype, weights = LOAD_DTYPES[dtype] if dtype is not None else (None, None)
    if dtype is None and device.type == "cpu":  # the CPU defaults, decided before loading: no second copy
        from nanoseek.hf import checkpoint_dtype

        stored = checkpoint_dtype(model_dir)
        if stored == torch.bfloat16:
            torch_dtype, weights = LOAD_DTYPES["bf16-weights"]
            print("nanoseek: bf16 weights kept as bf16, computed in float32 (--dtype bf16-weights, the CPU "
                  "default; --dtype bfloat16 computes in bf16)", file=sys.stderr)
        elif stored == torch.float16 and not cpu_has_fast_bf16():
            torch_dtype = torch.float32
            print("nanoseek: float16 weights upcast to float32 (this CPU has no fast half-precision matmuls; "
                  "pass --dtype to keep them)", file=sys.stderr)
    model = load(model_dir, dtype=torch_dtype, device=device, weights=weights).eval()
    fmt = getattr(model, "weight_format", None)
    narrow = f", {fmt['format']} weights" + (f" (groups of {fmt['group_size']})" if fmt.get("group_size") else "") \
        if fmt else ""
    if int8_activations:
        if device.type != "cpu" or not fmt or fmt.get("format") not in ("int8", "int4"):
            raise OptionError("--int8-activations needs int8 or int4 weights on a CPU (--dtype int8|int4, or a "
                              "checkpoint written by `nanoseek quantize --to int8|int4`)")
        from nanoseek.infer.fast import kernels

        if kernels.load() is None:
            st = kernels.status()
            raise OptionError(f"--int8-activations needs the C++ decode kernels, which are {st['state']} here "
                              f"({st['reason'] or 'NANOSEEK_KERNELS=0?'})")
        kernels.set_int8_activations(True)
        narrow += f", int8 activations ({kernels.int8_activation_kernel()} loop)"
    print(f"nanoseek: loaded {model_dir} ({model.num_params():,} parameters, "
          f"{str(model.embed_tokens.weight.dtype).removeprefix('torch.')}{narrow}) on {device}", file=sys.stderr)
    return model
