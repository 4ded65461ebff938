"""Atomic, self-verifying training checkpoints that are also Hugging Face model directories.

Layout of OUT/checkpoints/step_0000100/:
  config.json, model.safetensors, generation_config.json, tokenizer files   (nanoseek.save: a HF dir)
  optimizer.safetensors   AdamW moments keyed by parameter name (nanoseek.train.optim.optimizer_state)
  rng.safetensors         torch CPU/CUDA, numpy and Python RNG states as tensors
  train_state.json        step, tokens seen, the resolved run config
  manifest.json           size and sha256 of every file above, written last
A pipelined run writes the same folder sharded by pipeline rank (model-0000r-of-0000P.safetensors + index,
optimizer-0000r-of-0000P.safetensors; nanoseek.train.pipeline_state); either kind resumes under any layout.

Atomicity: everything is written into a hidden temporary folder, each file and the folder are fsynced,
then one rename publishes it. A crash at any moment leaves either no step_N folder or a complete one;
a damaged one (a disk error, a hand edit) fails the manifest check and `--resume` skips it with a warning.
Nothing is ever unpickled: tensors come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d{7,})$")
# one file, or one per pipeline rank (nanoseek.train.pipeline_state)
OPTIM_RE = re.compile(r"^optimizer(-\d{5}-of-\d{5})?\.safetensors$")
MANIFEST = "manifest.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- RNG states as tensors
def rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            st[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    st["numpy.meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    st["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    st["python.state"] = torch.tensor(internal, dtype=torch.int64)
    st["python.gauss"] = torch.tensor([float("nan") if gauss_next is None else gauss_next], dtype=torch.float64)
    return st


def set_rng_state(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in st:
                torch.cuda.set_rng_state(st[f"cuda.{i}"], i)
    pos, has_gauss = (int(x) for x in st["numpy.meta"])
    np.random.set_state(("MT19937", st["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(st["numpy.gauss"][0])))
    g = float(st["python.gauss"][0])
    random.setstate((3, tuple(int(x) for x in st["python.state"]), None if g != g else g))


# ----------------------------------------------------------------------------- save
def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optim_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], tokenizer_dir: str | Path | None, keep_last: int) -> Path:
    """Write step_{step} atomically under `root`, then delete all but the newest `keep_last`."""
    from nanoseek.hf import save as save_hf  # the HF layout lives in one place

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf(model, tmp, tokenizer_dir=tokenizer_dir)
    save_file(optim_state, str(tmp / "optimizer.safetensors"))
    return publish(tmp, root, step, train_state, keep_last)


def publish(tmp: Path, root: Path, step: int, train_state: dict[str, Any], keep_last: int) -> Path:
    """Finish a checkpoint whose model and optimizer files are in `tmp`: RNG state, train state, manifest,
    fsync, one rename to step_{step}, prune. (A pipelined run's stages write their files into `tmp` first,
    nanoseek.train.pipeline_state.)"""
    final = step_dir(root, step)
    save_file({k: v.contiguous() for k, v in rng_state().items()}, str(tmp / "rng.safetensors"))
    (tmp / "train_state.json").write_text(json.dumps({"step": step, **train_state}, indent=2) + "\n")
    files = {}
    for f in sorted(p for p in tmp.iterdir() if p.is_file()):
        _fsync(f)
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # a damaged checkpoint of the same step from an earlier run: replace it
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    _fsync(root)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftovers of interrupted saves."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)
    steps = sorted(list_checkpoints(root), reverse=True)
    for _, p in steps[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- find and load
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name)))


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint whose files match its manifest, else the reason it is not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (an interrupted save)"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for need in ("config.json", "rng.safetensors", "train_state.json"):
        if need not in files:
            return f"manifest lacks {need}"
    if not any(OPTIM_RE.match(name) for name in files):
        return "manifest lacks optimizer.safetensors"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta.get('size')}"
        if _sha256(f) != meta.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_valid(root: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    for step, path in reversed(list_checkpoints(root)):
        reason = verify(path)
        if reason is None:
            return path
        warn(f"skipping checkpoint {path}: {reason}")
    return None


def set_aside(root: str | Path, after_step: int) -> list[Path]:
    """Rename checkpoints newer than `after_step` (the invalid ones a resume skipped) to invalid-step_N, so
    the resumed run can write its own step_N and pruning never counts them; they stay for inspection."""
    moved = []
    for step, path in list_checkpoints(root):
        if step > after_step:
            dest = path.with_name(f"invalid-{path.name}")
            n = 1
            while dest.exists():
                dest, n = path.with_name(f"invalid-{path.name}.{n}"), n + 1
            os.rename(path, dest)
            moved.append(dest)
    return moved


def check_resumable(path: Path, model_state: dict[str, torch.Tensor], model_cfg) -> list[str]:
    """Whether the checkpoint at `path` (its weights `model_state`) can continue a run whose model is
    `model_cfg`. Tensors that do not fit (another preset, other layer sizes) are a CheckpointError that
    names the config fields that differ; a config that differs without changing any shape (say rope
    settings, for a context extension) is allowed, and returned as warnings."""
    import dataclasses

    from nanoseek.config import ModelConfig
    from nanoseek.hf import CheckpointError, read_config_json
    from nanoseek.model import Transformer

    saved = ModelConfig.from_hf(read_config_json(path))
    diffs = [f"{f.name} {getattr(saved, f.name)!r} (the config now: {getattr(model_cfg, f.name)!r})"
             for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(model_cfg, f.name)]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(model_cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model_state.items()}
    if got != expected:
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        what = "; ".join(diffs) if diffs else f"tensors {bad[:3]} differ"
        raise CheckpointError(f"the checkpoint holds another model than the run config describes: {what}", path,
                              "resume with the config the run was trained with (its config.toml), or choose "
                              "another --out for the new model")
    return [f"the checkpoint was trained with {d}; continuing with the config's values" for d in diffs]


def load_optimizer_files(path: Path) -> dict[str, torch.Tensor]:
    """The optimizer state of a checkpoint, merged over its files (one, or one per pipeline rank)."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(p for p in path.iterdir() if OPTIM_RE.match(p.name)):
        state.update(load_file(str(f)))
    return state


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """(model_state, optim_state, rng, train_state) of a verified checkpoint, all read without pickle."""
    from nanoseek.hf import load as load_hf

    path = Path(path)
    model = load_hf(path, dtype=torch.float32, device=device)
    model_state = {k: v for k, v in model.state_dict().items()}
    optim_state = load_optimizer_files(path)
    return (model_state, optim_state, *read_rng_and_state(path))


def read_rng_and_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(RNG states, train_state.json) of a checkpoint."""
    return load_file(str(path / "rng.safetensors")), json.loads((path / "train_state.json").read_text())
