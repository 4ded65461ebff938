"""benchmarks/bench_llamacpp.py: the pure parts (roofline bytes, build and conversion commands, the sdist
cache, ratios and the table, the checkpoint it converts) without llama.cpp; the whole benchmark in its
--quick mode when the cached llama.cpp build exists (slow)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import nanoseek
from benchmarks import bench_llamacpp as bl
from benchmarks.common import step_bytes, timed_decode, touched_bytes

REPO = Path(__file__).resolve().parent.parent


def test_touched_bytes_counts_top_k_of_the_experts_at_batch_1():
    assert touched_bytes(100, 800, 16, 4, 1) == pytest.approx(100 + 800 * 4 / 16)
    assert touched_bytes(100, 800, 16, 4, 8) == pytest.approx(100 + 800 * (1 - (12 / 16) ** 8))
    assert touched_bytes(100, 800, 16, 4, 10_000) == pytest.approx(900)  # a big batch touches every expert
    assert touched_bytes(100, 0, 0, 0, 1) == 100  # a dense model


def test_timed_decode_counts_the_tokens_of_the_steps_after_the_first():
    """The benchmarks' engine timing (bench_llamacpp, bench_16b): the first step gives one token per prompt,
    the rest are counted, and the tokens are what greedy decoding gives one prompt at a time."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny")).eval()
    prompts = [[3, 4, 5, 6], [7, 8]]
    run = timed_decode(model, prompts, 6)
    assert run["decode_tokens"] == 2 * 5 and run["first_step_s"] > 0 and run["decode_s"] > 0
    assert run["tokens"] == [timed_decode(model, [p], 6)["tokens"][0] for p in prompts]
    assert bl.nanoseek_decode(model, prompts[0], 5)["tokens"] == run["tokens"][0][:5]

def test_step_bytes_of_a_model_and_of_a_gguf_table_follow_the_same_rule():
    cfg = nanoseek.preset("tiny")
    model = nanoseek.Transformer(cfg)
    named = list(model.named_parameters()) + list(model.named_buffers())
    assert any(n.startswith("mtp.") for n, _ in named)  # tiny has an MTP module: plain decoding never reads it
    sizes = {n: t.numel() * t.element_size() for n, t in named if not n.startswith("mtp.")}
    experts = sum(v for n, v in sizes.items() if ".experts." in n)
    embed = sizes["embed_tokens.weight"]
    dense = sum(sizes.values()) - experts - embed
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert experts > 0 and step_bytes(model, 1) == pytest.approx(dense + experts * K / E)
    table = [["token_embd.weight", 4000, "F32"], ["output.weight", 4000, "F32"],
             ["blk.1.ffn_up_exps.weight", 8000, "Q8_0"], ["blk.1.ffn_up_shexp.weight", 1000, "Q8_0"],
             ["blk.1.attn_norm.weight", 10, "F32"]]
    assert bl.gguf_step_bytes(table, 8, 2) == pytest.approx(4000 + 1000 + 10 + 8000 * 2 / 8)


def test_cmake_builds_shared_native_library_then_llama_bench(tmp_path):
    cmds = bl.cmake_commands(tmp_path / "src", tmp_path / "build", jobs=2)
    configure, *builds = cmds
    assert configure[:3] == ["cmake", "-S", str(tmp_path / "src" / "vendor" / "llama.cpp")]
    assert {"-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"} <= set(configure)
    assert [b[b.index("--target") + 1] for b in builds] == ["llama", "llama-bench"]
    assert all(b[b.index("-j") + 1] == "2" and str(tmp_path / "build") in b for b in builds)


def test_convert_argv():
    assert bl.convert_argv(Path("/m"), Path("/o.gguf"), "q8_0") == [
        "convert_hf_to_gguf.py", "/m", "--outfile", "/o.gguf", "--outtype", "q8_0"]
    assert {outtype for _, outtype, _ in bl.PAIRS} == {"f32", "bf16", "f16", "q8_0"}
    assert {fmt for _, _, fmt in bl.PAIRS} == set(bl.NANOSEEK_WEIGHTS)


def test_cache_location_and_sdist_extraction_from_a_cached_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_LLAMACPP_CACHE", str(tmp_path / "cache"))
    root = bl.cache_root()
    assert root == tmp_path / "cache" / bl.LLAMA_CPP_PYTHON
    assert bl.built(root) is None
    root.mkdir(parents=True)
    top = f"llama_cpp_python-{bl.LLAMA_CPP_PYTHON}"
    with tarfile.open(root / f"{top}.tar.gz", "w:gz") as tf:  # the sdist's layout, one file
        data = b"# converter\n"
        info = tarfile.TarInfo(f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    src = bl.fetch_sdist(root)  # no pip download: the tarball is cached
    assert src == root / "src" and (src / "vendor/llama.cpp/convert_hf_to_gguf.py").read_bytes() == data
    assert bl.fetch_sdist(root) == src  # extracted once
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["src"]  # no temporary folder left
    (root / "build.json").write_text(json.dumps({"build_seconds": 5}))
    assert bl.built(root) == {"build_seconds": 5}
    env = bl.binding_env(root)
    assert env["LLAMA_CPP_LIB_PATH"] == str(root / "build" / "bin")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(root / "src"), str(root / "pydeps")]


def test_ratio_row_and_table():
    # 0.1 s/token for llama.cpp, 0.05 s for nanoseek; 1 GB per step; 20 GB/s
    row = bl.ratio_row("q8_0", "q8_0", "int8", 0.1, 0.05, 1e9, 0.5e9, 20.0, 9.0)
    assert row["llama_tokens_per_s"] == 10.0 and row["nanoseek_tokens_per_s"] == 20.0 and row["ratio"] == 2.0
    assert row["llama_roofline"] == 0.5 and row["nanoseek_roofline"] == 0.5
    assert row["ratio_vs_llama_bench"] == pytest.approx(20 / 9, abs=1e-3)
    no_bench = bl.ratio_row("f32", "f32", "fp32", 0.2, 0.1, 1e9, 1e9, 20.0, None)
    assert no_bench["llama_bench_tokens_per_s"] is None and no_bench["ratio"] == 2.0
    text = bl.format_table([row, no_bench], 1, 20.0)
    assert "threads 1" in text and "2.00x" in text and "50%" in text
    assert text.splitlines()[-1].split()[-1] == "-"


def test_agreement():
    assert bl.agreement([1, 2, 3, 4], [1, 2, 5, 4]) == {"positions": 4, "same_position": 3, "common_prefix": 2}
    assert bl.agreement([1, 2], [1, 2, 3]) == {"positions": 2, "same_position": 2, "common_prefix": 2}


def test_benchmark_checkpoint_loads_with_a_live_correction_bias(tmp_path):
    cfg = nanoseek.preset("tiny", num_nextn_predict_layers=0)
    bl.write_checkpoint(cfg, tmp_path / "hf")
    model = nanoseek.load(tmp_path / "hf", dtype=torch.float32)
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    assert (tmp_path / "hf" / "tokenizer.json").exists() and model.tokenizer_dir == str(tmp_path / "hf")
    assert bl.model_config(quick=False).n_group == 4 and bl.model_config(quick=False).hidden_size % 32 == 0


@pytest.mark.slow
def test_benchmark_quick_against_the_cached_llama_cpp(tmp_path):
    """The whole benchmark on the `bench` preset: converter, the binding's decode, nanoseek's, the JSON."""
    root = bl.cache_root()
    if bl.built(root) is None:
        pytest.skip(f"no cached llama.cpp build in {root}: run `python -m benchmarks.bench_llamacpp` once "
                    "(it builds llama.cpp there, tens of minutes on 2 cores)")
    out = tmp_path / "llamacpp.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_llamacpp", "--quick", "--threads", "1",
                        "--dir", str(tmp_path / "work"), "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = r["threads"]["1"]["rows"]
    assert [row["precision"] for row in rows] == [label for label, _, _ in bl.PAIRS]
    for row in rows:
        assert row["llama_tokens_per_s"] > 0 and row["nanoseek_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["nanoseek_tokens_per_s"] / row["llama_tokens_per_s"], rel=0.02)
        assert 0 < row["llama_roofline"] and 0 < row["nanoseek_roofline"]
        assert row["greedy_agreement"]["positions"] == r["new_tokens"]
    assert "Q8_0" in r["gguf_types"]["q8_0"] and "BF16" in r["gguf_types"]["bf16"]
    # both sides run the same model: at f32 the greedy tokens agree from the start
    assert rows[0]["greedy_agreement"]["common_prefix"] >= 1
    assert r["machine"]["cpu"]["model"]
