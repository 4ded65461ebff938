"""The one config-coercion helper (nanoseek.config_io) and the commands built on it: train, speedrun, sft,
distill and grpo read TOML tables and `--set` overrides with the same checks and the same errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanoseek.config import ConfigError
from nanoseek.config_io import apply_sets, check_value, coerce, from_table, parse_literal, split_set

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    steps: int = 1
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    weights: dict[str, float] | None = None
    sizes: list[int] | None = None


def test_check_value_types():
    assert check_value(3, float) == (True, 3.0) and isinstance(check_value(3, float)[1], float)
    assert not check_value(True, int)[0] and not check_value(1, bool)[0] and not check_value(1.5, int)[0]
    assert check_value(None, dict[str, float] | None) == (True, None)
    ok, v = check_value({"a": 1, "b": 0.5}, dict[str, float] | None)
    assert ok and v == {"a": 1.0, "b": 0.5} and isinstance(v["a"], float)
    assert not check_value({"a": "x"}, dict[str, float])[0]
    assert check_value([1, 2], list[int]) == (True, [1, 2]) and not check_value([1, "2"], list[int])[0]
    with pytest.raises(ConfigError, match=r"cfg: demo.steps must be int, got 'three'"):
        coerce("three", int, "cfg: demo.steps")


def test_from_table_names_the_key_and_the_type():
    d = from_table(Demo, {"steps": 4, "lr": 1, "weights": {"accuracy": 1}}, "demo", "f.toml")
    assert d.steps == 4 and d.lr == 1.0 and d.weights == {"accuracy": 1.0}
    with pytest.raises(ConfigError, match=r"f.toml: unknown key demo.stepz \(did you mean steps\?\); \[demo\] has"):
        from_table(Demo, {"stepz": 4}, "demo", "f.toml")
    with pytest.raises(ConfigError, match=r"f.toml: demo.flag must be bool, got 1"):
        from_table(Demo, {"flag": 1}, "demo", "f.toml")
    with pytest.raises(ConfigError, match=r"f.toml: \[demo\] must be a table"):
        from_table(Demo, 3, "demo", "f.toml")


def test_apply_sets():
    doc = {"demo": {"steps": 2}}
    out = apply_sets(doc, ["demo.lr=1", "demo.name=123", "demo.weights={a = 2}", "sizes=[1, 2]", "demo.flag=true"],
                     {"demo": Demo}, default_section="demo")
    assert out["demo"] == {"steps": 2, "lr": 1.0, "name": "123", "weights": {"a": 2.0}, "sizes": [1, 2], "flag": True}
    assert doc == {"demo": {"steps": 2}}  # the input is not modified
    assert apply_sets({}, ["demo.weights=none"], {"demo": Demo})["demo"]["weights"] is None
    with pytest.raises(ConfigError, match=r"--set demo.steps: expected int, got 'many'"):
        apply_sets({}, ["demo.steps=many"], {"demo": Demo})
    with pytest.raises(ConfigError, match=r"unknown section 'dmeo' \(did you mean demo\?\)"):
        apply_sets({}, ["dmeo.steps=1"], {"demo": Demo})
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        apply_sets({}, ["steps=1"], {"demo": Demo})  # no default section: the section is required
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        split_set("steps", default_section="demo")
    assert parse_literal(" 1e-3 ") == 1e-3 and parse_literal("abc") == "abc" and parse_literal("null") is None


def test_speedrun_plan_overrides_and_errors():
    from nanoseek.speedrun import QUICK, load_plan

    plan = load_plan(None, QUICK + ["sft.n_examples=16", "grpo.reward_weights={accuracy = 1, format = 0}",
                                    "eval.k=3", "train.steps=5"])
    assert plan.sft.n_examples == 16 and plan.sft.steps == 8 and plan.eval.k == 3 and plan.run.train.steps == 5
    assert plan.grpo.reward_weights == {"accuracy": 1.0, "format": 0.0} and plan.grpo.task == plan.speedrun.task
    for sets, message in ((["grpo.task=arithmetic"], "taken from speedrun.task"),
                          (["sft.stpes=3"], "did you mean steps"),
                          (["eval.k=two"], "--set eval.k: expected int"),
                          (["spedrun.task=x"], "did you mean speedrun")):
        with pytest.raises(ConfigError, match=message):
            load_plan(None, sets)


def test_grpo_sft_and_distill_command_configs(tmp_path):
    from nanoseek.rl import distill_cli, grpo_cli, sft_cli

    toml = tmp_path / "g.toml"
    toml.write_text("[grpo]\nG = 4\nlr = 1\n")
    p = argparse.ArgumentParser()
    grpo_cli.add_arguments(p)
    args = p.parse_args(["--model", "m", "--out", "o", "--config", str(toml), "--beta", "0.01",
                         "--set", "grpo.steps=3", "--set", "reward_weights={accuracy=1}"])
    cfg = grpo_cli.build_config(args)
    assert (cfg.G, cfg.lr, cfg.beta, cfg.steps, cfg.reward_weights) == (4, 1.0, 0.01, 3, {"accuracy": 1.0})
    toml.write_text("[grpo]\nG = \"four\"\n")
    with pytest.raises(ConfigError, match=r"g.toml: grpo.G must be int"):
        grpo_cli.build_config(p.parse_args(["--model", "m", "--out", "o", "--config", str(toml)]))

    cfg = sft_cli.sft_config({"steps": 5, "lr": 0.02, "min_lr": None}, ["weight_decay=0.1", "sft.grad_clip=0.5"])
    assert (cfg.steps, cfg.min_lr, cfg.weight_decay, cfg.grad_clip) == (5, pytest.approx(0.002), 0.1, 0.5)
    for cli, argv in ((sft_cli, ["--model", "m", "--data", "d", "--out", "o"]),
                      (distill_cli, ["--teacher", "t", "--task", "x", "--student-config", "tiny", "--out", "o"])):
        q = argparse.ArgumentParser()
        cli.add_arguments(q)
        assert q.parse_args([*argv, "--set", "grad_clip=2", "--set", "log_every=1"]).sets == ["grad_clip=2", "log_every=1"]
    with pytest.raises(ConfigError, match=r"--set sft.wd: unknown key"):
        sft_cli.sft_config({"steps": 5}, ["wd=0.1"])
