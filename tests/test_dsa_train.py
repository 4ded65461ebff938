"""V3.2's two indexer training stages through `nanoseek train` (real CLI subprocesses, one thread each):
tiny trained as V3, `nanoseek convert --to v3.2`, the dense warm-up (indexers only, KL to the dense
attention, logged as indexer_kl), then sparse training from the warm-up's export, with exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.data import PackedDataset
from nanoseek.model.dsa import indexer_kl_loss, set_train_stage
from test_train import ENV, assert_same_run, metrics, train

SEQ = 64  # tiny.toml's seq_len; the converted model keeps 16 tokens per query, so selection matters


def run(out, *extra, check=True):
    return train(out, "--set", "train.log_every=1", *extra, check=check)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny V3 run's export and its V3.2 conversion (top-16 of 64, 4 indexer heads of 16)."""
    root = tmp_path_factory.mktemp("dsa_train")
    run(root / "v3", "--set", "train.steps=20", "--set", "train.save_every=0")
    v32 = root / "v32"
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "convert", "--model", str(root / "v3" / "final"),
                        "--to", "v3.2", "--out", str(v32), "--index-topk", "16", "--index-n-heads", "4",
                        "--index-head-dim", "16"], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    return root, v32


@pytest.fixture(scope="module")
def warmup(converted):
    root, v32 = converted
    out = root / "warmup"
    run(out, "--set", f"train.init_from={v32}", "--set", "dsa.stage=warmup", "--set", "train.steps=16",
        "--set", "train.save_every=8", "--set", "train.warmup_steps=2", "--set", "train.lr=3e-3")
    return out


def _state(d):
    return nanoseek.load(d, dtype=torch.float32).state_dict()


def test_dense_warmup_trains_only_the_indexers(converted, warmup):
    _, v32 = converted
    recs = metrics(warmup)
    assert [r["step"] for r in recs] == list(range(1, 17))
    assert all(r["indexer_kl"] > 0 for r in recs)
    # the indexers learn the attention: the KL on a batch no step trained on, before and after
    held_out = PackedDataset(warmup / "data", SEQ).batch(10_000, 8, 0, 1, seed=0)[0]
    kl = {}
    for name, d in (("before", v32), ("after", warmup / "final")):
        model = nanoseek.load(d, dtype=torch.float32).eval()
        set_train_stage(model, "dense")
        with torch.no_grad():
            model(held_out)
        kl[name] = indexer_kl_loss(model).item()
    assert kl["after"] < 0.7 * kl["before"], kl
    before, after = _state(v32), _state(warmup / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    assert {k.split(".indexer.")[1] for k in changed} == {"wq_b.weight", "wk.weight", "k_norm.weight",
                                                          "k_norm.bias", "weights_proj.weight"}
    run_cfg = json.loads((warmup / "run_config.json").read_text())
    assert run_cfg["dsa"]["stage"] == "warmup" and run_cfg["model_resolved"]["index_topk"] == 16


def test_sparse_training_from_the_warmup_and_exact_resume(warmup, tmp_path):
    out = tmp_path / "sparse"
    args = ("--set", f"train.init_from={warmup / 'final'}", "--set", "dsa.stage=sparse", "--set", "train.steps=8",
            "--set", "train.save_every=4")
    run(out, *args)
    recs = metrics(out)
    assert all(r["indexer_kl"] > 0 and r["loss"] > 0 for r in recs)
    before, after = _state(warmup / "final"), _state(out / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".indexer." in k for k in changed) and any("self_attn.kv_b_proj" in k for k in changed)
    assert any(k.endswith("mlp.gate.e_score_correction_bias") for k in changed)  # balancing runs again
    # resume from the step-4 checkpoint (the step-8 one and the export gone): steps 5-8 are the same
    again = tmp_path / "resumed"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_0000008")
    shutil.rmtree(again / "final")
    p = run(again, *args, "--resume")
    assert "resumed from" in p.stderr
    assert_same_run(recs, metrics(again))
    assert [r["indexer_kl"] for r in metrics(again)] == pytest.approx([r["indexer_kl"] for r in recs], rel=1e-6)


def test_stage_errors(converted, tmp_path):
    root, _ = converted
    p = run(tmp_path / "a", "--set", "dsa.stage=warmup", "--set", "train.steps=1", check=False)
    assert p.returncode != 0 and "trains V3.2 indexers, but the model has none" in p.stderr
    p = run(tmp_path / "b", "--set", "dsa.stage=dense", check=False)
    assert p.returncode != 0 and "dsa.stage must be one of" in p.stderr
    p = run(tmp_path / "c", "--set", f"train.init_from={tmp_path / 'nowhere'}", check=False)
    assert p.returncode != 0 and "train.init_from: cannot read" in p.stderr
