"""The GPU suite and benchmark, seen from a CPU machine: the gpu-marked tests are collected (and only skipped
for want of CUDA), bench_gpu refuses with one clear line, and the prepared GPU check script parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    return subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_gpu_tests_are_collected_under_the_gpu_marker():
    r = _run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/test_gpu.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]
    for name in ("test_cuda_logits_match_cpu_fp32", "test_30_steps_of_tiny_on_cuda_track_cpu_fp32",
                 "test_fp8_linear_three_gemms_blockwise_vs_emulation", "test_fp8_grouped_experts_blockwise_vs_emulation",
                 "test_speculative_decoding_on_cuda", "test_openai_server_on_cuda",
                 "test_checkpoint_from_a_cuda_run_loads_on_cpu_with_equal_logits"):
        assert any(name in i for i in ids), f"{name} not collected"
    # The default run (make test) deselects them.
    r = _run(sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_gpu.py")
    assert "deselected" in r.stdout and not any(line.startswith("tests/test_gpu.py::") for line in r.stdout.splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_bench_gpu_without_cuda_says_so_in_one_line():
    r = _run(sys.executable, "-m", "benchmarks.bench_gpu", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing measured" in lines[0]


def test_gpu_check_script_parses_and_make_knows_the_targets():
    assert _run("bash", "-n", "scripts/gpu_check.sh").returncode == 0
    r = _run("make", "-n", "test-gpu", "bench-gpu", "gpu-check")
    assert r.returncode == 0, r.stderr
    assert "-m pytest -q -m gpu" in r.stdout and "benchmarks.bench_gpu" in r.stdout and "gpu_check.sh" in r.stdout
    assert "pip install" not in r.stdout  # the GPU targets install nothing


def test_the_gpu_speedrun_test_is_in_make_test_gpu_but_not_in_the_timed_check():
    r = _run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/test_speedrun_gpu.py")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if line.startswith("tests/test_speedrun_gpu.py::")]
    assert ids == ["tests/test_speedrun_gpu.py::test_gpu_speedrun_on_cuda"], ids
    # scripts/gpu_check.sh's stage limits leave no room for it (its header says why): it deselects exactly it.
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert "SPEEDRUN_TEST=tests/test_speedrun_gpu.py::test_gpu_speedrun_on_cuda" in script
    assert script.count("--deselect") == 2
