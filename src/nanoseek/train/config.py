"""RunConfig: the typed pretraining run configuration, read from TOML with `--set section.key=value` overrides.

Sections: `[model]` (a preset name plus HF deepseek_v3 field overrides), `[data]`, `[train]`, `[moe]`,
`[mtp]`, `[parallel]`, `[fp8]`, `[dsa]` (the V3.2 indexer's training stages, nanoseek.train.dsa).
Defaults are the V3 report's (section 4.2 and 2.1.2): AdamW beta2 0.95, weight decay 0.1, grad clip 1.0,
balancing speed gamma 0.001, sequence-wise aux alpha 1e-4, MTP weight 0.3.
Every key is type-checked (nanoseek.config_io); an unknown key or a bad value is a ConfigError naming it,
because a misspelt key that silently does nothing wastes a training run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, ConfigError, ModelConfig
from nanoseek.config_io import (apply_sets, field_types, from_table, model_config_from_mapping, read_toml, set_value,
                                split_set, suggest)
from nanoseek.train.schedule import ON_EXTEND

DTYPES = ("auto", "bf16", "fp32")
FP8_BACKENDS = ("auto", "emulate", "blockwise", "scaled_mm")  # = nanoseek.train.fp8_gemm.BACKENDS


@dataclass
class DataConfig:
    source: str = "builtin"      # "builtin" (generated corpus) or a path: text file, folder, JSONL, Parquet
    tokenizer: str = "train"     # "train" (byte-level BPE trained on the corpus) or a tokenizer directory
    vocab_size: int = 512        # requested tokenizer size; the trained one may be smaller
    n_docs: int = 2000           # built-in corpus size in documents
    seed: int = 0                # built-in corpus seed
    max_difficulty: int = 2      # built-in corpus: hardest task level included


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8          # global batch, in sequences, whatever the world size
    micro_batch_size: int = 0    # per rank and forward; 0 = the whole per-rank batch (no accumulation)
    seq_len: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4         # the end of the cosine decay (V3: 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 10
    decay_frac: float = 0.3      # the last fraction of the steps decays along a cosine; constant before
    schedule_on_extend: str = "continue"  # resuming with a changed schedule (more steps): "continue" | "rewarm"
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0       # 0 = no clipping
    dtype: str = "auto"          # auto: bf16 autocast on CUDA and on CPUs with fast bf16, else fp32
    device: str = "auto"         # auto: cuda when available, else cpu (under torchrun the rank's device)
    seed: int = 0
    log_every: int = 10
    save_every: int = 0          # 0 = only at the end
    keep_last: int = 2
    threads: int = 0             # torch intra-op threads; 0 = torch's default
    init_from: str = ""          # a HF model directory whose weights (and config, tokenizer) start the run


@dataclass
class MoEConfig:
    bias_update_speed: float = 0.001   # gamma of the aux-loss-free sign rule; 0 turns balancing off
    seq_aux_alpha: float = 1e-4        # the complementary sequence-wise balance loss


@dataclass
class MTPConfig:
    loss_weight: float = 0.3


PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")  # = nanoseek.train.pipeline_plan.SCHEDULES


@dataclass
class ParallelConfig:
    ep: int = 1          # expert-parallel degree (inside each pipeline stage)
    fsdp: bool = True    # shard parameters with FSDP2 when world > 1
    pp: int = 1          # pipeline-parallel degree (nanoseek.train.pipeline)
    pp_schedule: str = "1F1B"    # 1F1B | Interleaved1F1B | ZBVZeroBubble | DualPipeV
    pp_microbatches: int = 0     # per step and data-parallel rank; 0 = batch / micro_batch_size, or the stages
    pp_virtual_stages: int = 0   # stages per pipeline rank; 0 = the schedule's (1 for 1F1B, else 2)
    pp_layers: list[int] = field(default_factory=list)  # decoder layers per stage; [] = as even as possible
    redundant_experts: int = 0   # EPLB: extra expert replicas per MoE layer over the EP group (a multiple of ep)
    eplb_interval: int = 0       # re-place the replicas by EPLB every N steps from the measured loads; 0 = never


@dataclass
class FP8Config:
    enabled: bool = False
    block: int = 128            # activation tiles 1 x block, weight blocks block x block (V3: 128)
    backend: str = "auto"       # auto | emulate | blockwise (Hopper FP8 kernels) | scaled_mm (K-sliced)


DSA_STAGES = ("off", "warmup", "sparse")  # = nanoseek.train.dsa.STAGES


@dataclass
class DSAConfig:
    stage: str = "off"          # off | warmup (indexers only, KL to dense attention) | sparse (top-k, LM + KL)
    kl_weight: float = 1.0      # sparse stage: weight of the indexer KL added to the LM loss


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "moe": MoEConfig, "mtp": MTPConfig,
                             "parallel": ParallelConfig, "fp8": FP8Config, "dsa": DSAConfig}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    dsa: DSAConfig = field(default_factory=DSAConfig)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig of [model]; `vocab_size` (the tokenizer's) replaces the preset's unless [model]
        sets a larger one explicitly (a padded vocabulary, as the published checkpoints have). With
        train.init_from, the directory's config.json, [model] fields overriding it."""
        if self.train.init_from:
            return _init_model_config(self.train.init_from, self.model)
        cfg = model_config_from_mapping(self.model, source="[model]")
        if vocab_size is not None:
            explicit = self.model.get("vocab_size")
            if explicit is not None and explicit < vocab_size:
                raise ConfigError(f"[model] vocab_size = {explicit} is smaller than the tokenizer's {vocab_size}")
            if explicit is None:
                cfg = cfg.replace(vocab_size=vocab_size)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}}

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v, f'{section}.{k}')}" for k, v in values.items() if v is not None]
            lines.append("")
        return "\n".join(lines)

    def save(self, out_dir: str | Path, model_cfg: ModelConfig | None = None) -> None:
        """DIR/config.toml (loadable with --config) and DIR/run_config.json (the same, plus the model's
        fully resolved fields under "model_resolved")."""
        out = Path(out_dir)
        (out / "config.toml").write_text(self.to_toml())
        d = self.to_dict()
        if model_cfg is not None:
            d["model_resolved"] = model_cfg.to_dict()
        (out / "run_config.json").write_text(json.dumps(d, indent=2) + "\n")

    def validate(self) -> None:
        t, need = self.train, _need
        for k in ("steps", "batch_size", "seq_len", "log_every", "keep_last"):
            need(getattr(t, k) >= 1, f"train.{k} must be >= 1, got {getattr(t, k)}")
        for k in ("micro_batch_size", "warmup_steps", "save_every", "threads", "seed"):
            need(getattr(t, k) >= 0, f"train.{k} must be >= 0, got {getattr(t, k)}")
        need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
        need(0 <= t.min_lr <= t.lr, f"train.min_lr must be in [0, train.lr={t.lr}], got {t.min_lr}")
        need(0 <= t.decay_frac <= 1, f"train.decay_frac must be in [0, 1], got {t.decay_frac}")
        need(t.schedule_on_extend in ON_EXTEND,
             f"train.schedule_on_extend must be one of {ON_EXTEND}, got {t.schedule_on_extend!r}")
        need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
        need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
        need(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
        need(t.dtype in DTYPES, f"train.dtype must be one of {DTYPES}, got {t.dtype!r}")
        need(t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda"),
             f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
        need(t.micro_batch_size == 0 or t.batch_size % t.micro_batch_size == 0,
             f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
        need(self.moe.bias_update_speed >= 0, f"moe.bias_update_speed must be >= 0, got {self.moe.bias_update_speed}")
        need(self.moe.seq_aux_alpha >= 0, f"moe.seq_aux_alpha must be >= 0, got {self.moe.seq_aux_alpha}")
        need(self.mtp.loss_weight >= 0, f"mtp.loss_weight must be >= 0, got {self.mtp.loss_weight}")
        par = self.parallel
        need(par.ep >= 1, f"parallel.ep must be >= 1, got {par.ep}")
        need(par.redundant_experts >= 0 and par.eplb_interval >= 0,
             f"parallel.redundant_experts and parallel.eplb_interval must be >= 0, got {par.redundant_experts}, "
             f"{par.eplb_interval}")
        need(par.redundant_experts == 0 or (par.ep > 1 and par.redundant_experts % par.ep == 0),
             f"parallel.redundant_experts={par.redundant_experts} needs parallel.ep > 1 and must be a multiple of "
             f"it (every EP rank holds as many expert slots), got ep={par.ep}")
        need(par.redundant_experts == 0 or par.pp == 1,
             "parallel.redundant_experts is not supported with pipeline parallelism (parallel.pp > 1) yet")
        need(par.eplb_interval == 0 or par.redundant_experts > 0,
             "parallel.eplb_interval re-places redundant experts: set parallel.redundant_experts too")
        from nanoseek.train.pipeline_plan import check_config

        check_config(self)  # schedule name, stages per rank, layer plan
        need(self.fp8.block >= 1, f"fp8.block must be >= 1, got {self.fp8.block}")
        need(self.fp8.backend in FP8_BACKENDS, f"fp8.backend must be one of {FP8_BACKENDS}, got {self.fp8.backend!r}")
        need(self.dsa.stage in DSA_STAGES, f"dsa.stage must be one of {DSA_STAGES}, got {self.dsa.stage!r}")
        need(self.dsa.kl_weight >= 0, f"dsa.kl_weight must be >= 0, got {self.dsa.kl_weight}")
        need(self.dsa.stage == "off" or self.parallel.pp == 1,
             f"dsa.stage = {self.dsa.stage!r} runs without pipeline parallelism (parallel.pp = 1)")
        d = self.data
        need(bool(d.source), "data.source must be 'builtin' or a path")
        need(d.vocab_size >= 1 and d.n_docs >= 1, "data.vocab_size and data.n_docs must be >= 1")
        need(d.max_difficulty >= 1, f"data.max_difficulty must be >= 1, got {d.max_difficulty}")
        model = self.model_config()  # raises a ConfigError naming a bad [model] key or value
        need(self.dsa.stage == "off" or model.is_dsa,
             f"dsa.stage = {self.dsa.stage!r} trains V3.2 indexers, but the model has none: start from a "
             "`nanoseek convert --to v3.2` directory (train.init_from) or a deepseek_v32 preset")


def _init_model_config(path: str, overrides: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a model directory's config.json with [model]'s fields (not a preset) on top."""
    f = Path(path).expanduser() / "config.json"
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.init_from: cannot read {f} ({e})") from None
    extra = {k: v for k, v in overrides.items() if k != "preset"}
    try:
        cfg = ModelConfig.from_hf(doc)
        return cfg.replace(**extra) if extra else cfg
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"train.init_from: {f}: {e}") from None


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _toml_value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else _bad(key, v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string literal is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, key) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x, key)}" for k, x in v.items() if x is not None) + "}"
    return _bad(key, v)


def _bad(key: str, v: Any) -> str:
    raise ConfigError(f"{key}: value {v!r} cannot be written to TOML")


# ----------------------------------------------------------------------------- TOML and --set (nanoseek.config_io)
def build(doc: dict[str, Any], source: str = "config") -> RunConfig:
    """A validated RunConfig from a decoded TOML document."""
    unknown = sorted(set(doc) - set(SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected [model] and {sorted(SECTIONS)}")
    cfg = RunConfig()
    if "model" in doc:
        if not isinstance(doc["model"], dict):
            raise ConfigError(f"{source}: [model] must be a table")
        cfg.model = dict(doc["model"])
    for name, cls in SECTIONS.items():
        setattr(cfg, name, from_table(cls, doc.get(name, {}), name, source))
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `doc` with each `section.key=value` applied; the key must exist (model: a preset or an HF
    deepseek_v3 field name)."""
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    model_fields = {"preset": str, **field_types(ModelConfig)}
    others = []
    for item in overrides:
        section, key, text = split_set(item)
        if section != "model":
            others.append(item)
            continue
        if key not in model_fields:
            raise ConfigError(f"--set model.{key}: unknown model field {key!r}{suggest(key, model_fields)}; "
                              "use HF deepseek_v3 names")
        value = set_value(text, model_fields[key], f"--set model.{key}")
        if key == "preset" and value not in PRESETS:
            raise ConfigError(f"--set model.preset: unknown preset {value!r}; choose one of {sorted(PRESETS)}")
        doc.setdefault("model", {})[key] = value
    return apply_sets(doc, others, {"model": ModelConfig, **SECTIONS})


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (or the defaults when path is None) and apply `--set` overrides."""
    doc: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        doc = read_toml(path)
    return build(apply_overrides(doc, overrides or []), source=source)
