"""Checkpoints and the final export of a pipelined run (nanoseek.train.pipeline), written stage by stage.

A pipelined run's step_N folder is the HF directory one process writes, sharded by pipeline rank:
`model-0000r-of-0000P.safetensors` holds the tensors of pipeline rank r-1's stages in HF names (a weight two
stages share is stored by the rank of stage 0), `model.safetensors.index.json` maps every name to its file,
and `optimizer-0000r-of-0000P.safetensors` holds the AdamW state of those parameters. So a checkpoint is
still something nanoseek.load and transformers open.

Saving: the processes of a pipeline rank gather their stages' full tensors (FSDP shards all-gathered,
experts reassembled over the stage's EP group); its data-parallel rank 0 writes them into one shared
temporary folder; after a barrier, global rank 0 writes the config, tokenizer, index, RNG and train state
and publishes the folder with nanoseek.train.checkpoint.publish (manifest, fsync, one rename). A SIGKILL at
any moment leaves no step_N folder or a complete one, as in one process.

Resuming: every process reads the tensors of its own parameters from whichever files hold them and keeps
its shard (no broadcast): a pipelined run resumes one-process checkpoints and the other way round.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek import hf
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.checkpoint import OPTIM_RE
from nanoseek.train.full_state import _gather, _scatter  # the per-tensor gather/scatter of FSDP + EP state
from nanoseek.train.pipeline import Pipeline


def _shard_name(kind: str, pipe: Pipeline) -> str:
    return f"{kind}-{pipe.pp_rank + 1:05d}-of-{pipe.pp:05d}.safetensors"


def _stored_elsewhere(pipe: Pipeline) -> set[str]:
    """Names this rank holds but does not store: each tensor is stored once, a shared weight by stage 0's rank."""
    if pipe.pp_rank == pipe.plan.rank_of[0]:
        return set()
    shared = pipe.shared_params()
    return {n for n, p in pipe.shell.named_parameters(remove_duplicate=False) if id(p) in shared}


@torch.no_grad()
def _gather_stage(pipe: Pipeline, opt: torch.optim.Optimizer | None):
    """(model state, optimizer state) of this rank's stages, full tensors on CPU. Collective over the stage."""
    dist, keep = pipe.dist, pipe.dp_rank == 0
    elsewhere = _stored_elsewhere(pipe)
    model: dict[str, torch.Tensor] = {}
    for name, t in pipe.shell.state_dict().items():
        full = _gather(name, t, dist)
        if keep and name not in elsewhere:
            model[name] = full.detach().cpu().contiguous().clone()
    optim: dict[str, torch.Tensor] = {}
    if opt is not None:
        for name, p in pipe.shell.named_parameters():
            for kind, v in sorted(opt.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    full = _gather(name, v, dist)
                    if keep and name not in elsewhere:
                        optim[f"{kind}/{name}"] = full.detach().cpu().contiguous().clone()
    return model, optim


def _write_model(pipe: Pipeline, tmp: Path, opt, tokenizer_dir) -> None:
    """Every rank: gather; the stage leaders write their shards; rank 0 the config, tokenizer and index."""
    model, optim = _gather_stage(pipe, opt)
    if pipe.dp_rank == 0:
        tensors = {k: v.contiguous().clone() for k, v in hf.hf_tensors(model, pipe.cfg)}
        save_file(tensors, str(tmp / _shard_name("model", pipe)), metadata={"format": "pt"})
        if opt is not None:
            save_file(optim, str(tmp / _shard_name("optimizer", pipe)))
    tdist.barrier()
    if pipe.dist.rank == 0:
        dtype = next(p.dtype for p in pipe.shell.parameters() if p.is_floating_point())
        hf.write_config(pipe.cfg, dtype, tmp)
        hf.copy_tokenizer(tokenizer_dir, tmp)
        hf.write_index(tmp)


def _fresh_tmp(pipe: Pipeline, tmp: Path) -> None:
    if pipe.dist.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    tdist.barrier()


def save_checkpoint(root: str | Path, step: int, pipe: Pipeline, opt: torch.optim.Optimizer,
                    train_state: dict[str, Any], tokenizer_dir, keep_last: int) -> Path:
    """Write step_{step} under `root` from every stage (collective); see the module docstring."""
    root = Path(root)
    final = ckpt.step_dir(root, step)
    tmp = root / f".tmp-{final.name}-pipeline"  # one name every process knows; pruned if a save is killed
    _fresh_tmp(pipe, tmp)
    _write_model(pipe, tmp, opt, tokenizer_dir)
    if pipe.dist.rank == 0:
        ckpt.publish(tmp, root, step, {**train_state, "pipeline": {"pp": pipe.pp, "schedule": pipe.plan.schedule}},
                     keep_last)
    tdist.barrier()
    return final


def export(out: Path, pipe: Pipeline, tokenizer_dir) -> Path:
    """DIR/final: one HF directory (sharded by pipeline rank, with its index and tokenizer), renamed into place."""
    final = out / "final"
    tmp = out / ".tmp-final-pipeline"
    _fresh_tmp(pipe, tmp)
    _write_model(pipe, tmp, None, tokenizer_dir)
    if pipe.dist.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    tdist.barrier()
    return final


# ----------------------------------------------------------------------------- resume
class _Reader:
    """Full tensors of a checkpoint folder by our parameter names (HF shards or one file)."""

    def __init__(self, path: Path, cfg):
        self.path, self.cfg = path, cfg
        self.weight_map = hf._checkpoint_files(path)
        self.files: dict[str, Any] = {}

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise hf.CheckpointError(f"{self.path}: no tensor {key!r}")
        f = self.weight_map[key]
        if f not in self.files:
            self.files[f] = safe_open(str(self.path / f), framework="pt")
        return self.files[f].get_tensor(key)

    def model_tensor(self, name: str) -> torch.Tensor:
        cfg = self.cfg
        L, E = cfg.num_hidden_layers, cfg.n_routed_experts
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            name = "embed_tokens.weight"
        if name.endswith("experts.gate_up_proj"):
            base = hf.ours_to_hf(name[: -len("gate_up_proj")], L)
            return torch.stack([torch.cat([self._get(f"{base}{e}.gate_proj.weight"),
                                           self._get(f"{base}{e}.up_proj.weight")]) for e in range(E)])
        if name.endswith("experts.down_proj"):
            base = hf.ours_to_hf(name[: -len("down_proj")], L)
            return torch.stack([self._get(f"{base}{e}.down_proj.weight") for e in range(E)])
        return self._get(hf.ours_to_hf(name, L))


@torch.no_grad()
def load_checkpoint(path: Path, pipe: Pipeline, opt: torch.optim.Optimizer) -> None:
    """Load a verified checkpoint's model and optimizer state into this rank's stages (every rank reads)."""
    from torch.distributed.tensor import DTensor

    reader = _Reader(path, pipe.cfg)
    dist = pipe.dist
    for name, t in pipe.shell.state_dict().items():
        full = reader.model_tensor(name).to(device=dist.device, dtype=t.dtype)
        want = list(t.shape)
        if dist.ep > 1 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want[0] *= dist.ep
        if list(full.shape) != want:
            raise hf.CheckpointError(f"{name}: checkpoint shape {list(full.shape)} != model shape {want}")
        piece = _scatter(name, full, t, dist)
        (t.to_local() if isinstance(t, DTensor) else t).copy_(piece.to_local() if isinstance(piece, DTensor) else piece)
    files = sorted(p for p in path.iterdir() if OPTIM_RE.match(p.name))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            where.update({k: f for k in fh.keys()})
    opened: dict[Path, Any] = {}
    for name, p in pipe.shell.named_parameters():
        st: dict[str, torch.Tensor] = {}
        for kind in ("step", "exp_avg", "exp_avg_sq"):
            key = f"{kind}/{name}"
            if key not in where:
                continue
            fh = opened.setdefault(where[key], safe_open(str(where[key]), framework="pt"))
            v = fh.get_tensor(key)
            st[kind] = v.to(torch.float32).clone() if kind == "step" else \
                _scatter(name, v.to(dist.device), p, dist)
        if st:
            opt.state[p] = st
        elif p.requires_grad:
            raise hf.CheckpointError(f"{path}: no optimizer state for {name}")
