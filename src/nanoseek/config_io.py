"""Reading a ModelConfig from whatever a user points a command at.

Three spellings of "a model" reach the command line:
  * a preset name (`tiny`, `deepseek-v3`, ...; see `nanoseek.config.PRESETS`);
  * a Hugging Face `config.json`, or a checkpoint directory that holds one;
  * a nanoseek TOML run config whose `[model]` table has `preset = "..."` and/or HF field overrides
    (the format of the pretraining issue: `[model]`, `[data]`, `[train]`, ... sections).
`model_config_from_toml` and `load_model_config` turn each into a validated `ModelConfig`; errors are
`ConfigError`s that name the file and the offending key.

The second half is the one config-coercion helper of every command that builds a typed config
(`train`, `speedrun`, `sft`, `grpo`, `distill`): `from_table` / `typed_values` check a TOML table against
a dataclass, `apply_sets` applies `--set section.key=value` overrides, both with errors that name the key
and the expected type. It imports nothing beyond `nanoseek.config`, so any command may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
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


# ----------------------------------------------------------------------------- typed sections and --set
# Every command that builds a config from TOML tables and `--set` overrides goes through these, so a key
# is checked the same way everywhere: unknown keys and wrongly typed values are ConfigErrors that name the
# key and the expected type (a misspelt key that silently did nothing would waste a run).
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) for a TOML-decoded value against a field type. Ints are accepted where floats belong
    (and become floats, also inside lists and tables); bools are never ints."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is not type(None):
                ok, v = check_value(value, a)
                if ok:
                    return True, v
        return False, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if not isinstance(value, list):
            return False, value
        checked = [check_value(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False, value
        kt, vt = args if args else (Any, Any)
        checked = {k: check_value(v, vt) for k, v in value.items()}
        ok = all(check_value(k, kt)[0] for k in value) and all(ok for ok, _ in checked.values())
        return ok, {k: v for k, (_, v) in checked.items()}
    return isinstance(value, tp), value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """The value, checked (and ints made floats) for a field of type tp; else a ConfigError naming `where`."""
    ok, v = check_value(value, tp)
    if not ok:
        raise ConfigError(f"{where} must be {type_name(tp)}, got {value!r}")
    return v


def suggest(key: str, known: Any) -> str:
    """' (did you mean X?)' for a misspelt key, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def typed_values(cls: type, table: Any, section: str, source: str) -> dict[str, Any]:
    """The checked keyword arguments for dataclass `cls` from the TOML table `[section]` of `source`."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{section}] must be a table, got {type(table).__name__}")
    hints = field_types(cls)
    out = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {section}.{key}{suggest(key, hints)}; "
                              f"[{section}] has {sorted(hints)}")
        out[key] = coerce(value, hints[key], f"{source}: {section}.{key}")
    return out


def from_table(cls: type, table: Any, section: str, source: str):
    """An instance of dataclass `cls` from the TOML table `[section]` (missing keys keep their defaults)."""
    return cls(**typed_values(cls, table, section, source))


def parse_literal(text: str) -> Any:
    """`--set` values are read as TOML literals (30, 1e-3, true, "x", [1, 2], {a = 1.0}); none/null is
    None, and anything else is the text itself."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None if text.lower() in ("none", "null") else text


def split_set(item: str, default_section: str | None = None) -> tuple[str, str, str]:
    """`section.key=value` -> (section, key, value text); `key=value` when there is a default section."""
    path, eq, text = item.partition("=")
    section, dot, key = path.strip().partition(".")
    if not dot and default_section:
        section, key = default_section, path.strip()
    if not eq or not key or not section:
        example = "KEY=VALUE" if default_section else "section.key=value (e.g. train.steps=30)"
        raise ConfigError(f"--set {item!r}: expected {example}")
    return section, key, text


def set_value(text: str, tp: Any, where: str) -> Any:
    """A `--set` value for a field of type tp: a TOML literal, except that a string field takes the text
    as written (data.source=123 is a path named 123)."""
    ok, v = check_value(parse_literal(text), tp)
    if not ok and check_value(text.strip(), tp)[0]:
        ok, v = True, text.strip()
    if not ok:
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {text.strip()!r}")
    return v


def apply_sets(doc: dict[str, Any], overrides: list[str], schema: dict[str, type],
               default_section: str | None = None) -> dict[str, Any]:
    """A copy of the TOML document `doc` with each `section.key=value` of `overrides` applied, checked
    against `schema` (section name -> dataclass). With `default_section`, a bare `key=value` means that
    section."""
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    for item in overrides:
        section, key, text = split_set(item, default_section)
        where = f"--set {section}.{key}"
        if section not in schema:
            raise ConfigError(f"--set {section}.{key}: unknown section {section!r}{suggest(section, schema)}; "
                              f"expected one of {sorted(schema)}")
        hints = field_types(schema[section])
        if key not in hints:
            raise ConfigError(f"{where}: unknown key{suggest(key, hints)}; [{section}] has {sorted(hints)}")
        doc.setdefault(section, {})[key] = set_value(text, hints[key], where)
    return doc
