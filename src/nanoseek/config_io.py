"""Reading a ModelConfig from whatever a user points a command at.

Three spellings of "a model" reach the command line:
  * a preset name (`tiny`, `deepseek-v3`, ...; see `nanoseek.config.PRESETS`);
  * a Hugging Face `config.json`, or a checkpoint directory that holds one;
  * a nanoseek TOML run config whose `[model]` table has `preset = "..."` and/or HF field overrides
    (the format of the pretraining issue: `[model]`, `[data]`, `[train]`, ... sections).
`model_config_from_toml` and `load_model_config` turn each into a validated `ModelConfig`; errors are
`ConfigError`s that name the file and the offending key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, ConfigError, ModelConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser lives in the `tomli` package
    import tomli as tomllib  # type: ignore[no-redef]

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def model_config_from_mapping(model: dict[str, Any], source: str = "[model]") -> ModelConfig:
    """A ModelConfig from the contents of a `[model]` table: optional `preset`, then field overrides.

    Without a preset the ModelConfig defaults (the DeepSeek-V3 shape) are the base. Keys must be
    ModelConfig (= HF deepseek_v3) field names; anything else is a ConfigError naming the key, since a
    misspelt override that silently did nothing would train the wrong model.
    """
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: the model section must be a table, got {type(model).__name__}")
    overrides = dict(model)
    name = overrides.pop("preset", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{source}: preset must be a string, got {name!r}")
    if name is not None and name not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(k for k in overrides if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown model field(s) {unknown}; expected HF deepseek_v3 names "
                          f"such as hidden_size, num_hidden_layers, n_routed_experts")
    base = dict(PRESETS[name]) if name else {}
    try:
        return ModelConfig(**{**base, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a wrongly typed value (e.g. a string where a number belongs)
        raise ConfigError(f"{source}: invalid model config: {e}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a ConfigError naming it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def model_config_from_toml(path: str | Path) -> ModelConfig:
    """The ModelConfig of a nanoseek TOML run config (its `[model]` table)."""
    p = Path(path)
    doc = read_toml(p)
    if "model" not in doc:
        raise ConfigError(f"{p}: no [model] section (expected e.g. [model] preset = \"tiny\")")
    return model_config_from_mapping(doc["model"], source=f"{p} [model]")


def load_model_config(path: str | Path) -> ModelConfig:
    """A ModelConfig from a TOML run config, a config.json, or a directory holding config.json."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: directory has no config.json")
        return ModelConfig.from_json(p / "config.json")
    if not p.exists():
        raise ConfigError(f"{p}: no such config file")
    if p.suffix.lower() == ".toml":
        return model_config_from_toml(p)
    return ModelConfig.from_json(p)


def resolve_model_config(preset_name: str | None = None, config_path: str | Path | None = None) -> ModelConfig:
    """What `--preset NAME | --config PATH` options mean; exactly one must be given."""
    if (preset_name is None) == (config_path is None):
        raise ConfigError("give exactly one of --preset NAME or --config PATH")
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
        return ModelConfig(**PRESETS[preset_name])
    return load_model_config(config_path)  # type: ignore[arg-type]
