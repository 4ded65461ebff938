"""What a model directory is, and the one-line errors for what users pass instead.

A model directory is a Hugging Face folder with config.json (and safetensors shards, tokenizer files).
`check_model_dir` names what a wrong path is instead (missing, a file, a run folder of nanoseek's own
commands) and what to pass; `read_config_json` reads config.json with an error that names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import ConfigError
from .errors import CheckpointError

# Where nanoseek's commands put a model inside their output folder: `train` and `grpo` RUN/final,
# `speedrun` RUN/model (its stages' RUN/sft and RUN/pretrain/final too), checkpoints RUN/checkpoints/step_N.
RUN_MODEL_DIRS = ("final", "model", "pretrain/final")


def check_model_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a model directory (it holds config.json), else a CheckpointError that
    says what it is instead and what to pass: a missing path, a file (`.../config.json`), or a run folder
    (`did you mean RUN/final?`)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError("no such model directory", path, "check the path (a `nanoseek train` run keeps its "
                              "model in RUN/final, a speedrun in RUN/model)")
    if not path.is_dir():
        raise CheckpointError("a file, not a model directory", path, f"pass the folder that holds it: {path.parent}")
    found = [path / d for d in RUN_MODEL_DIRS if (path / d / "config.json").is_file()]
    steps = sorted((path / "checkpoints").glob("step_*/config.json"))
    if not found and steps:
        found = [steps[-1].parent]
    if found:
        raise CheckpointError("a run folder, not a model directory", path,
                              f"did you mean {found[0]}?")
    raise CheckpointError("not a model directory: no config.json", path,
                          "pass a Hugging Face deepseek_v3 folder (config.json + model.safetensors), e.g. RUN/final")


def read_config_json(path: Path) -> dict:
    """The parsed config.json of a model directory; a corrupt one is a ConfigError naming the file."""
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"config.json is not valid JSON ({getattr(e, 'msg', e)}{where})", file,
                          "restore the file, or export the model again") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json holds a {type(cfg).__name__}, not an object", file,
                          "restore the file, or export the model again")
    return cfg
