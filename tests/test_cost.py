"""GPU-hour and dollar projections, implied MFU, token-count parsing and `nanoseek cost`."""

from __future__ import annotations

import json
import sys

import pytest

from nanoseek.accounting import training_flops_per_token
from nanoseek.cli import main
from nanoseek.config import preset
from nanoseek.cost import implied_mfu, parse_count, project

V3 = preset("deepseek-v3")


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanoseek"])  # cli.main rewrites sys.argv
    return main


def test_parse_count():
    assert parse_count("14.8T") == pytest.approx(14.8e12)
    assert parse_count("500B") == 500e9
    assert parse_count("2.664M") == pytest.approx(2.664e6)
    assert parse_count("180k") == 180e3
    assert parse_count("1e12") == 1e12
    assert parse_count("2,048") == 2048
    assert parse_count("1_000") == 1000
    for bad in ("14.8X", "", "T", "-5B", "0", "1.2.3M", "inf"):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_projection_arithmetic():
    p = project(flops_per_token=6e9, tokens=1e12, peak=1e15, mfu=0.5, price_per_gpu_hour=3.0, num_gpus=100)
    assert p.total_flops == 6e21
    assert p.gpu_hours == pytest.approx(6e21 / 0.5e15 / 3600)
    assert p.cost_usd == pytest.approx(3.0 * p.gpu_hours)
    assert p.wall_days == pytest.approx(p.gpu_hours / 100 / 24)
    assert implied_mfu(6e9, 1e12, 1e15, p.gpu_hours) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        project(6e9, 1e12, 1e15, mfu=1.5)


def test_deepseek_v3_implied_mfu():
    """14.8T tokens on 2.664M H800 GPU-hours (V3 report: 180K GPU-hours per trillion tokens)."""
    assert 14.8 * 180e3 == pytest.approx(2.664e6)
    no_mtp = training_flops_per_token(V3, 4096, include_mtp=False)
    with_mtp = training_flops_per_token(V3, 4096)
    assert implied_mfu(no_mtp, 14.8e12, 989e12, 2.664e6) == pytest.approx(0.3908, abs=1e-4)
    assert implied_mfu(with_mtp, 14.8e12, 989e12, 2.664e6) == pytest.approx(0.4067, abs=1e-4)


def test_cost_cli_json(cli, capsys):
    rc = cli(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--gpu", "H800", "--gpu-hours", "2.664M",
              "--num-gpus", "2048", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu"] == "H800" and d["peak_flops"] == 989e12 and d["mfu"] == 0.4
    assert d["gpu_hours"] == pytest.approx(d["total_flops"] / (989e12 * 0.4) / 3600)
    assert d["cost_usd"] == pytest.approx(2.0 * d["gpu_hours"])
    assert d["implied_mfu"] == pytest.approx(0.4067, abs=1e-4)
    assert d["known_cost_usd"] == pytest.approx(5.328e6)
    assert cli(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--gpu-hours", "2664K",
                "--no-mtp", "--dtype", "fp8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["implied_mfu"] == pytest.approx(0.3908 * 989 / 1979, abs=1e-4)


def test_cost_cli_table(cli, capsys):
    assert cli(["cost", "--preset", "tiny", "--tokens", "500B", "--gpu", "A100", "--mfu", "0.5", "--price", "1.5",
                "--gpu-hours", "10"]) == 0
    out = capsys.readouterr().out
    for s in ("A100, 312.0 TFLOP/s dense BF16", "assumed MFU", "50.0%", "$1.50/GPU-hour", "implied MFU"):
        assert s in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope", "--tokens", "1T", "--gpu", "H100"], "unknown preset 'nope'"),
    (["--config", "/nonexistent/run.toml", "--tokens", "1T", "--gpu", "H100"], "no such config file"),
    (["--preset", "tiny", "--tokens", "14.8X", "--gpu", "H100"], "cannot read '14.8X'"),
    (["--preset", "tiny", "--tokens", "1T", "--gpu", "V100"], "unknown GPU 'V100'"),
    (["--preset", "tiny", "--tokens", "1T", "--gpu", "H100", "--mfu", "0"], "MFU must be in (0, 1]"),
    (["--preset", "tiny", "--tokens", "1T", "--gpu", "A100", "--dtype", "fp8"], "no FP8"),
    (["--preset", "tiny", "--tokens", "1T", "--gpu", "H100", "--gpu-hours", "lots"], "cannot read 'lots'"),
])
def test_cost_cli_errors(cli, capsys, argv, message):
    assert cli(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
