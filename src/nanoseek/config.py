"""ModelConfig: the DeepSeek-V3 / V3.2 architecture as a typed dataclass with Hugging Face field names.

`model_type` follows the attention: `deepseek_v3` (dense MLA) or, when `index_topk` is set, `deepseek_v32`
(DeepSeek Sparse Attention: a lightning indexer with `index_n_heads` x `index_head_dim` per layer keeps the
`index_topk` best-scoring earlier tokens for MLA; see nanoseek.model.dsa). It reads both config.json styles
found in the wild:
  * the published hub files (`rope_scaling: {"type": "yarn", ...}`, `rope_theta`, `topk_method`,
    `scoring_func`, `seq_aux`, `quantization_config`, ...), and
  * the transformers 5 style (`rope_parameters: {"rope_type": ..., "rope_theta": ...}`, `rope_interleave`).
`to_hf()` writes both spellings so that transformers, vLLM, SGLang and llama.cpp's converter all read
the same architecture (a config without `scoring_func` is read as softmax gating by some consumers:
llama.cpp's HF-to-GGUF converter then silently computes the wrong router).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
ROPE_TYPES = ("default", "yarn")

# Keys that appear in real config.json files but do not change the computation we perform.
_KNOWN_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "attention_dropout", "output_router_logits", "ep_size",
    "moe_layer_freq", "num_key_value_heads", "qk_head_dim", "head_dim", "aux_loss_alpha",
    "router_aux_loss_coef", "initializer_range", "_name_or_path", "num_mtp_layers", "hidden_act",
    "attention_bias", "rope_scaling", "rope_parameters", "rope_theta", "id2label", "label2id",
    "tie_word_embeddings", "return_dict", "output_hidden_states", "output_attentions", "is_decoder",
    "chunk_size_feed_forward", "problem_type", "keys_to_ignore_at_inference", "mlp_bias",
    "layer_types",  # deepseek_v32: ["indexed_attention"] * L, which only picks transformers' cache class
}
MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2")
MLP_LAYER_TYPES = ("dense", "sparse")
# transformers' DeepseekV32Config defaults, used when a deepseek_v32 config.json leaves a field out.
_V32_DEFAULTS = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}


class ConfigError(NanoseekError, ValueError):
    """An invalid or unreadable model configuration; the message names the offending field."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    seq_aux: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN parameters (None = plain rope): factor, original_max_position_embeddings, beta_fast,
    # beta_slow, mscale, mscale_all_dim, and optionally attention_factor / truncate.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    # DeepSeek Sparse Attention (V3.2). None = dense MLA (V3); otherwise each query attends to the
    # index_topk earlier tokens its layer's lightning indexer scores highest.
    index_topk: int | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    # Per-layer "dense" | "sparse" (MoE) pattern, transformers' deepseek_v32 spelling; when given it wins over
    # first_k_dense_replace (set to its leading dense count). None = the first first_k_dense_replace layers
    # dense, the rest MoE (a dense-then-MoE list is normalised to this form).
    mlp_layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # FP8 checkpoints carry this; we keep it so a re-save can say what the source was.
    quantization_config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        types = self.mlp_layer_types
        if isinstance(types, (list, tuple)):
            self.mlp_layer_types = types = list(types)
            # What readers that know only first_k_dense_replace see: the leading dense layers.
            self.first_k_dense_replace = next((i for i, t in enumerate(types) if t != "dense"), len(types))
        self.validate()
        if types is not None and all(t == "sparse" for t in types[self.first_k_dense_replace:]):
            self.mlp_layer_types = None  # a plain dense-then-MoE pattern: one canonical spelling

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_dsa(self) -> bool:
        """DeepSeek Sparse Attention (V3.2, model_type deepseek_v32) rather than dense MLA."""
        return self.index_topk is not None

    @property
    def model_type(self) -> str:
        return "deepseek_v32" if self.is_dsa else "deepseek_v3"

    @property
    def is_moe_layer(self) -> list[bool]:
        if self.mlp_layer_types is not None:
            return [t == "sparse" and self.n_routed_experts > 0 for t in self.mlp_layer_types]
        return [i >= self.first_k_dense_replace and self.n_routed_experts > 0 for i in range(self.num_hidden_layers)]

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim ** -0.5, times mscale**2 when YaRN sets mscale_all_dim, where
        mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (DeepSeek-V3's inference/model.py does the same)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}")
        need(isinstance(self.first_k_dense_replace, int) and 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace!r}")
        need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers!r}")
        need(self.scoring_func in SCORING_FUNCS, f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS, f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.n_routed_experts:
            E = self.n_routed_experts
            need(isinstance(E, int) and E > 0, f"n_routed_experts must be a positive integer, got {E!r}")
            need(self.moe_intermediate_size > 0, f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
            need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
            need(E % self.n_group == 0,
                 f"n_routed_experts ({E}) must be divisible by n_group ({self.n_group}) (n_routed_experts % n_group != 0)")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group}) (topk_group > n_group)")
            need(1 <= self.num_experts_per_tok <= E,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and n_routed_experts ({E})")
            if self.n_group > 1 and self.topk_method != "greedy":
                per_group = E // self.n_group
                need(self.num_experts_per_tok <= self.topk_group * per_group,
                     f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group groups "
                     f"({self.topk_group} x {per_group})")
                if self.topk_method == "noaux_tc":
                    need(per_group >= 2, f"noaux_tc group scores sum the top-2 experts of a group; a group has {per_group}")
            need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.mlp_layer_types is not None:
            types = self.mlp_layer_types
            need(isinstance(types, list) and len(types) == self.num_hidden_layers and all(t in MLP_LAYER_TYPES for t in types),
                 f"mlp_layer_types must be a list of {self.num_hidden_layers} entries from {MLP_LAYER_TYPES}, got {types!r}")
            need(self.is_dsa or all(t == "sparse" for t in types[self.first_k_dense_replace:]),
                 f"mlp_layer_types {types} is not dense-then-MoE; only deepseek_v32 (index_topk set) checkpoints can "
                 "say that (transformers' deepseek_v3 reads first_k_dense_replace alone)")
        if self.is_dsa:
            for name in ("index_topk", "index_n_heads", "index_head_dim"):
                v = getattr(self, name)
                need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the "
                 "indexer ropes the first qk_rope_head_dim dims of its query and key")
            need(self.q_lora_rank is not None,
                 "DeepSeek Sparse Attention needs q_lora_rank: the lightning indexer reads the q-LoRA latent")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(isinstance(rs, dict), f"rope_scaling must be a mapping or null, got {rs!r}")
            need(rs.get("type", "yarn") in ROPE_TYPES, f"rope_scaling type must be one of {ROPE_TYPES}, got {rs.get('type')!r}")
            if rs.get("type", "yarn") == "yarn":
                need(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1,
                     f"rope_scaling.factor must be a number >= 1, got {rs.get('factor')!r}")

    # ----------------------------------------------------------------- HF interop
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict, either hub style or transformers 5 style."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        mtype = d.get("model_type", "deepseek_v3")
        if mtype not in MODEL_TYPES:
            raise ConfigError(f"model_type {mtype!r} is not a DeepSeek-V2/V3/V3.2 architecture (expected one of {MODEL_TYPES})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k not in ("rope_scaling", "rope_theta")}
        if mtype == "deepseek_v32":
            for k, v in _V32_DEFAULTS.items():
                if kw.get(k) is None:
                    kw[k] = v
            if d.get("indexer_rope_interleave"):
                raise ConfigError("indexer_rope_interleave=true is not DeepSeek-V3.2 (its indexer ropes half-split); "
                                  "that is GLM-5's glm_moe_dsa variant")
        else:
            present = sorted(k for k in _V32_DEFAULTS if d.get(k) is not None)
            if present:
                raise ConfigError(f"{present} in a {mtype} config: DeepSeek Sparse Attention checkpoints say "
                                  "model_type \"deepseek_v32\"")
        types = d.get("mlp_layer_types")
        if types is not None and "first_k_dense_replace" in d and isinstance(types, list):
            lead = next((i for i, t in enumerate(types) if t != "dense"), len(types))
            if lead != d["first_k_dense_replace"]:
                raise ConfigError(f"mlp_layer_types starts with {lead} dense layer(s) but first_k_dense_replace is "
                                  f"{d['first_k_dense_replace']}")
        unknown = sorted(k for k in d if k not in names and k not in _KNOWN_IGNORED_KEYS)
        if unknown:
            warnings.warn(f"config.json keys not used by nanoseek: {unknown}", stacklevel=2)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (DeepSeek uses silu)")
        if d.get("moe_layer_freq", 1) not in (1, None):
            raise ConfigError(f"moe_layer_freq {d['moe_layer_freq']!r} is not supported (DeepSeek-V2/V3 use 1: every "
                              "layer after first_k_dense_replace is MoE)")
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=true is not supported (DeepSeek projections have no bias)")
        kw["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
        # Rope: transformers 5 keeps everything in rope_parameters; hub files use rope_theta + rope_scaling.
        rp = d.get("rope_parameters") or {}
        rs = d.get("rope_scaling") or None
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        kw["rope_theta"] = float(theta)
        scaling = None
        src = rs if rs else rp
        rtype = (src.get("type") or src.get("rope_type") or "default") if src else "default"
        if rtype not in ROPE_TYPES:
            raise ConfigError(f"rope type {rtype!r} is not supported (expected one of {ROPE_TYPES})")
        if rtype == "yarn":
            scaling = {k: v for k, v in src.items() if k not in ("type", "rope_type", "rope_theta")}
            scaling["type"] = "yarn"
        kw["rope_scaling"] = scaling
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = kw["n_group"]
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        if d.get("model_type") == "deepseek_v2" or ("scoring_func" not in d and "topk_method" not in d
                                                    and d.get("model_type") != "deepseek_v3"):
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
        for k in ("seq_aux", "norm_topk_prob", "rope_interleave"):
            if k in kw and kw[k] is None:
                del kw[k]
        try:
            return cls(**kw)
        except TypeError as e:  # a wrongly typed value that made arithmetic fail
            raise ConfigError(f"invalid config: {e}") from e

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers 5 and the published-format readers both understand."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("rope_scaling")
        if self.is_dsa:
            # transformers' deepseek_v32 reads mlp_layer_types (first_k_dense_replace is for everyone else)
            d["mlp_layer_types"] = ["sparse" if moe else "dense" for moe in self.is_moe_layer]
        else:
            for k in ("index_topk", "index_n_heads", "index_head_dim", "mlp_layer_types"):
                d.pop(k)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        rope_params: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            rope_params = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                           **{k: v for k, v in rs.items() if k != "type"}}
            d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rs.items() if k != "type"}}
        d.update(
            architectures=["DeepseekV32ForCausalLM" if self.is_dsa else "DeepseekV3ForCausalLM"],
            model_type=self.model_type,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            num_key_value_heads=self.num_attention_heads,  # MLA: every head has its own key (HF default is 128)
            rope_parameters=rope_params,
            moe_layer_freq=1,
            use_cache=True,
        )
        if dtype:
            d["torch_dtype"] = dtype
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown model config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ----------------------------------------------------------------------------- presets
_V3_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096}

_SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
              kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
              n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
              max_position_embeddings=2048, num_nextn_predict_layers=1)
_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
           num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
           kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
           n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
           routed_scaling_factor=2.5, max_position_embeddings=163840, rope_scaling=dict(_V3_YARN),
           num_nextn_predict_layers=1)

PRESETS: dict[str, dict[str, Any]] = {
    # Used by every test: every feature on (group routing, q_lora, MTP), seconds on a CPU.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                 max_position_embeddings=1024, num_nextn_predict_layers=1),
    # Learns the built-in tasks visibly in ~10 minutes on 2 CPU cores.
    "small": _SMALL,
    # The benchmark config of the foundation issue.
    "bench": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                  num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
                  kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                  n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  max_position_embeddings=4096, num_nextn_predict_layers=0),
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                             routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
                             norm_topk_prob=False, max_position_embeddings=163840, bos_token_id=100000,
                             eos_token_id=100001,
                             rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                             num_nextn_predict_layers=0),
    # `small` with DeepSeek Sparse Attention: index_topk 32 < the 128-token training sequences of
    # configs/small.toml, so the indexer's choice matters from the first batch.
    "small-dsa": {**_SMALL, "index_topk": 32, "index_n_heads": 4, "index_head_dim": 32},
    "deepseek-v3": _V3,
    # DeepSeek-V3.2 (and V3.2-Exp) as published: V3 plus a lightning indexer of 64 heads x 128 per layer
    # (the MTP layer included) keeping the top 2048 tokens.
    "deepseek-v3.2": {**_V3, "rope_scaling": dict(_V3_YARN), "index_topk": 2048, "index_n_heads": 64,
                      "index_head_dim": 128},
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
