"""`nanoseek speedrun --out DIR`: the whole DeepSeek-V3 -> R1 pipeline on the built-in data, end to end.

  1 tokenizer   byte-level BPE on the generated corpus (nanoseek.data)
  2 pretrain    a small MoE with MLA and MTP through the training engine (nanoseek.train, V3 report)
  3 SFT         cold start on the task's worked solutions in the <think> format (R1 section 2.3.1)
  4 eval        held-out pass@1 / cons@k of the SFT model
  5 GRPO        RL with rule rewards (R1 section 2.2; nanoseek.rl.trainer lists its departures)
  6 eval        the same held-out problems, same samples settings
  7 export      a HF deepseek_v3 directory with the tokenizer and chat template

Every setting lives in one TOML file (configs/speedrun.toml: the pretraining sections of a
`nanoseek train` config plus [speedrun], [sft], [eval], [grpo]); `--set section.key=value` overrides
any key and `--quick` swaps in a model and step counts small enough for a one-minute smoke run.
`--preset gpu` is configs/speedrun-gpu.toml: the same stages with a DeepSeek-V3-shaped MoE of a few
hundred million parameters in bf16, sized for about ten minutes on one H100 / H200 (the README's GPU
section has the estimate). A config with train.device = "cuda" refuses to start without CUDA unless
--device cpu says to run it on the CPU anyway.
Outputs (nanoseek.speedrun_report): DIR/report.json (accuracy before/after RL, stage times, tokens/s,
MFU, cost projection), DIR/report.md with the plots under DIR/plots, and the exported model in DIR/model.
What a run measured is in its report.json; the README quotes one.

The task is Countdown at difficulty 1 (three numbers up to 9), TinyZero's RL task: many expressions are
correct, so the SFT model's samples find rewards that GRPO can reinforce. Multi-step arithmetic was tried
first: its SFT model improved with more SFT but not with GRPO (one correct answer per problem, errors in
memorised facts that a few hundred rollouts cannot fix), and at learning rates that moved it at all the
policy collapsed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.config_io import apply_sets, from_table, read_toml, split_set, suggest, typed_values
from nanoseek.rl.sft import SFTConfig
from nanoseek.rl.trainer import GRPOConfig
from nanoseek.train.config import SECTIONS as TRAIN_SECTIONS
from nanoseek.train.config import RunConfig, apply_overrides, build

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CONFIGS / "speedrun.toml"
# `--preset NAME`: the shipped speedrun configs.
PRESETS = {"cpu": DEFAULT_CONFIG, "gpu": CONFIGS / "speedrun-gpu.toml"}

# A model and step counts for a ~1 minute smoke run (tests use it).
QUICK = [
    "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.num_attention_heads=2",
    "data.n_docs=400", "data.vocab_size=320", "train.steps=12", "train.batch_size=8", "train.seq_len=64",
    "train.warmup_steps=2", "train.log_every=4", "sft.steps=8", "sft.batch_size=8", "sft.n_examples=64",
    "eval.n=12", "eval.k=2", "eval.max_new_tokens=40", "eval.base=false",
    "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.G=4", "grpo.max_new_tokens=40", "speedrun.threads=1",
]


@dataclasses.dataclass
class SpeedrunConfig:
    task: str = "countdown"
    difficulty: int = 1
    threads: int = 0            # torch threads; 0 = one per core not already busy (see idle_cores)


@dataclasses.dataclass
class SFTStage(SFTConfig):
    n_examples: int = 2000      # worked solutions drawn from the task's train split


@dataclasses.dataclass
class EvalConfig:
    n: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    base: bool = True           # also evaluate the pretrained model (before SFT)
    seed: int = 0


# The speedrun's own sections; the others are a `nanoseek train` run config (nanoseek.train.config).
OWN_SECTIONS: dict[str, type] = {"speedrun": SpeedrunConfig, "sft": SFTStage, "eval": EvalConfig, "grpo": GRPOConfig}


@dataclasses.dataclass
class Plan:
    run: RunConfig              # pretraining
    speedrun: SpeedrunConfig
    sft: SFTStage
    eval: EvalConfig
    grpo: GRPOConfig
    source: str = ""            # the TOML file it came from


def load_plan(path: str | Path | None, overrides: list[str]) -> Plan:
    """The speedrun's settings: the TOML file, then each `section.key=value` override."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError(f"speedrun config {p} not found (pass --config FILE)")
    src = str(p)
    doc = read_toml(p)
    own = {s: doc.pop(s, {}) for s in OWN_SECTIONS}
    own_sets, train_sets = [], []
    for item in overrides:
        section, key, _ = split_set(item)
        if section not in OWN_SECTIONS and section != "model" and section not in TRAIN_SECTIONS:
            raise ConfigError(f"--set {section}.{key}: unknown section {section!r}{suggest(section, [*OWN_SECTIONS, *TRAIN_SECTIONS])}"
                              f"; expected one of {sorted(['model', *TRAIN_SECTIONS, *OWN_SECTIONS])}")
        (own_sets if section in OWN_SECTIONS else train_sets).append(item)
    own = apply_sets(own, own_sets, OWN_SECTIONS)
    run = build(apply_overrides(doc, train_sets), source=src)
    sr = from_table(SpeedrunConfig, own["speedrun"], "speedrun", src)
    sft = from_table(SFTStage, own["sft"], "sft", src).validate()
    ev = from_table(EvalConfig, own["eval"], "eval", src)
    for key in ("task", "difficulty"):  # one task for SFT, eval and GRPO alike
        if key in own["grpo"]:
            raise ConfigError(f"{src}: grpo.{key} is taken from speedrun.{key} (one task for SFT, eval and GRPO); "
                              "set that instead")
    try:
        grpo = GRPOConfig(**typed_values(GRPOConfig, own["grpo"], "grpo", src), task=sr.task,
                          difficulty=sr.difficulty).validate()
    except ValueError as e:  # GRPOConfig.validate names the key
        raise ConfigError(f"{src}: {e}") from None
    if ev.n < 1 or ev.k < 1 or ev.max_new_tokens < 1:
        raise ConfigError(f"{src}: eval.n, eval.k and eval.max_new_tokens must be >= 1")
    return Plan(run, sr, sft, ev, grpo, src)


def check_device(plan: Plan):
    """The device every stage runs on (the pretraining's train.device), checked before anything runs.

    A config that names CUDA (configs/speedrun-gpu.toml) is sized for a GPU: on a machine without one it
    stops with one line rather than fall back to a CPU run that would take hours. `--device cpu` (which
    sets train.device) is how to ask for that run anyway.
    """
    import torch

    from nanoseek.device import resolve_device

    name = plan.run.train.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"{plan.source} is sized for a CUDA GPU (train.device = {name!r}) and CUDA is not "
                          f"available ({why})", hint="pass --device cpu to run it on the CPU anyway (it would take "
                          "hours), or run the CPU speedrun (without --preset gpu)")
    return resolve_device(name, "train.device")


def idle_cores() -> int:
    """Cores not already kept busy by other processes (1-minute load average), at least 1.

    On a shared machine more torch threads than idle cores is far slower than fewer: OpenMP's barriers
    spin while the threads wait for a core.
    """
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n
    return max(1, min(n, n - int(load + 0.5)))


# ----------------------------------------------------------------------------- the stages
class Stages:
    """The speedrun's stages and what they hand each other: the tokenizer, the model (trained in place from
    one stage to the next), stage times, evaluations and samples for the report."""

    def __init__(self, out: Path, plan: Plan, progress: bool):
        from nanoseek.data.tasks import get_task

        self.out, self.plan, self.progress = out, plan, progress
        self.device = check_device(plan)  # pretraining's; every stage's
        self.task = get_task(plan.speedrun.task)
        self.pre = out / "pretrain"
        self.times: dict[str, float] = {}
        self.evals: dict[str, dict] = {}
        self.samples: dict[str, list[dict]] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t

    def tokenizer(self) -> None:
        from nanoseek.train.prepare import prepare_data

        if self.pre.exists():
            shutil.rmtree(self.pre)  # the speedrun always starts afresh
        with self.timed("tokenizer"):
            self.tok, self.tok_dir, _ = prepare_data(self.plan.run.data, self.pre, progress=self.progress,
                                                     log=lambda m: print(m, file=sys.stderr))

    def pretrain(self) -> None:
        import torch

        import nanoseek
        from nanoseek.train.loop import train

        with self.timed("pretrain"):
            final = train(self.plan.run, self.pre, progress=self.progress)
        self.model = nanoseek.load(final, dtype=torch.float32, device=self.device)

    def evaluate(self, stage: str, key: str, label: str, keep_samples: bool = True) -> None:
        """Held-out pass@1 / cons@k of the model as it is now, with the same problems and samples each time."""
        from nanoseek.rl.evaluate import evaluate

        ev, sr = self.plan.eval, self.plan.speedrun
        with self.timed(stage):
            res = evaluate(self.model, self.tok, self.task, n=ev.n, k=ev.k, difficulty=sr.difficulty,
                           temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, seed=ev.seed,
                           progress=self.progress)
        self.evals[key] = res.to_dict()
        if keep_samples:
            self.samples[label] = res.samples
        print(f"{label}: pass@1 {res.pass_at_1:.1%}, cons@{res.k} {res.cons_at_k:.1%}, format {res.format_rate:.1%}",
              file=sys.stderr)

    def sft(self) -> None:
        import torch

        import nanoseek
        from nanoseek.rl.sft import load_sft_data, sft_train

        plan = self.plan
        with self.timed("sft"):
            pairs = load_sft_data(plan.speedrun.task, self.tok, n=plan.sft.n_examples, difficulty=plan.speedrun.difficulty,
                                  seed=plan.run.train.seed)
            torch.manual_seed(plan.sft.seed)
            self.sft_records = sft_train(self.model, pairs, plan.sft, self.tok.pad_id, progress=self.progress)
            nanoseek.save(self.model, self.out / "sft", tokenizer_dir=self.tok_dir)

    def grpo(self) -> None:
        from nanoseek.rl.trainer import GRPOTrainer

        with self.timed("grpo"):
            grpo_dir = self.out / "grpo"
            if grpo_dir.exists():
                shutil.rmtree(grpo_dir)
            trainer = GRPOTrainer(self.model, self.tok, self.plan.grpo, out_dir=grpo_dir, tokenizer_dir=self.tok_dir,
                                  progress=self.progress, task=self.task)
            self.history = trainer.train()

    def export(self) -> None:
        """DIR/model: written to a temporary folder, renamed, then loaded back (model and tokenizer)."""
        import nanoseek
        from nanoseek.data.tokenizer import load_tokenizer

        with self.timed("export"):
            self.model_dir = self.out / "model"
            tmp = self.out / ".tmp-model"
            if tmp.exists():
                shutil.rmtree(tmp)
            nanoseek.save(self.model, tmp, tokenizer_dir=self.tok_dir)
            if self.model_dir.exists():
                shutil.rmtree(self.model_dir)
            os.rename(tmp, self.model_dir)
            nanoseek.load(self.model_dir)
            load_tokenizer(self.model_dir)


def machine(device) -> dict:
    """Where a run ran: the numbers of a run depend on these as well as on its config, since the thread
    count and the CPU's kernels change the order of floating-point sums (README, "The main job")."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpu": cpu, "torch": torch.__version__}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return out



# The MFU the GPU speedrun's sizes assume (README, GPUs: "The GPU speedrun"); the printed estimate uses it.
ASSUMED_MFU = 0.15


def pretraining_estimate(plan: Plan, device) -> str:
    """One line before the run: the pretraining FLOPs (FLOPs per token x tokens) and the time they take at
    ASSUMED_MFU of this device's peak, so that a GPU-sized plan started on a CPU says what it costs."""
    from nanoseek.accounting import training_flops_per_token
    from nanoseek.device import autocast_dtype, device_peak_flops

    t = plan.run.train
    tokens = t.steps * t.batch_size * t.seq_len
    flops = training_flops_per_token(plan.run.model_config(), t.seq_len) * tokens
    peak = device_peak_flops(device, autocast_dtype(t.dtype, device))

    def when(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} hours"

    return (f"pretraining: {tokens:,} tokens, {flops:.3g} FLOPs: {when(flops / peak)} at this device's whole "
            f"{peak / 1e12:.3g} TFLOP/s peak, {when(flops / (ASSUMED_MFU * peak))} at {ASSUMED_MFU:.0%} MFU")


def _banner(i: int, name: str) -> None:
    print(f"\n[{i}/7] {name}", file=sys.stderr, flush=True)


def speedrun(out: str | Path, plan: Plan, progress: bool = True) -> dict:
    """Run the seven stages into `out`; returns the report (also written as out/report.json and report.md)."""
    import torch

    from nanoseek.speedrun_report import build_report, write_report

    check_device(plan)  # before anything is written: a GPU plan on a CPU machine stops here
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sr = plan.speedrun
    torch.set_num_threads(sr.threads or idle_cores())
    run = Stages(out, plan, progress)
    print(f"{plan.source} on {run.device}; {torch.get_num_threads()} torch thread(s)", file=sys.stderr)
    print(pretraining_estimate(plan, run.device), file=sys.stderr)
    t_all = time.perf_counter()
    _banner(1, "train the tokenizer (and tokenize the built-in corpus)")
    run.tokenizer()
    _banner(2, "pretrain the MoE with MLA and MTP")
    run.pretrain()
    if plan.eval.base:
        run.evaluate("eval_base", "base", "pretrained", keep_samples=False)
    _banner(3, f"cold-start SFT on {sr.task} (difficulty {sr.difficulty})")
    run.sft()
    _banner(4, "evaluate the SFT model on held-out problems")
    run.evaluate("eval_before_rl", "sft", "SFT")
    _banner(5, f"GRPO: {plan.grpo.steps} steps x {plan.grpo.prompts_per_step} prompts x G={plan.grpo.G}")
    run.grpo()
    _banner(6, "evaluate the GRPO model on the same held-out problems")
    run.evaluate("eval_after_rl", "grpo", "GRPO")
    _banner(7, "export a Hugging Face directory with the tokenizer and chat template")
    run.export()
    report = build_report(plan, run.model, run.evals, run.history, run.times, time.perf_counter() - t_all,
                          run.pre / "metrics.jsonl", run.model_dir)
    report["machine"] = machine(run.device)  # what the numbers depend on besides the config (README says how)
    return write_report(out, report, run.pre, run.sft_records, run.history, run.samples)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (report.json, report.md, plots/, model/)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", default=None, help=f"speedrun TOML (default {DEFAULT_CONFIG})")
    which.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="a shipped speedrun: cpu = configs/speedrun.toml (the default), gpu = "
                            "configs/speedrun-gpu.toml (a few hundred million parameters, ~10 minutes on one H100)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a ~1 minute smoke run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key, e.g. --set grpo.steps=10 or --set train.steps=50 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars: the losses as log lines")


def run(args: argparse.Namespace) -> int:
    path = PRESETS[args.preset] if args.preset else args.config
    plan = load_plan(path, (QUICK if args.quick else []) + list(args.sets))  # --device/--threads: sets
    report = speedrun(args.out, plan, progress=not args.no_progress)
    before, after = report["accuracy_before_rl"], report["accuracy_after_rl"]
    md = Path(args.out) / "report.md"
    print(f"\nheld-out pass@1: {before:.1%} after SFT -> {after:.1%} after GRPO ({100 * (after - before):+.1f} points)")
    print(f"total {report['total_seconds']:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds"].items()))
    print(f"report: {md}")
    print(f"\nchat with the result:\n  nanoseek chat --model {report['model_dir']}\n"
          f"  nanoseek serve --model {report['model_dir']}   # OpenAI-compatible API + web chat")
    return 0
