"""The GRPO training loop: batched rollouts through the inference engine, rule rewards, clipped updates.

Follows DeepSeek-R1 (arXiv 2501.12948, section 2.2) and GRPO (DeepSeekMath, arXiv 2402.03300, section
4.1, Algorithm 1). One step: draw `prompts_per_step` train-split problems, sample G completions of each
in ONE `Engine.generate_batch` call over the latent cache, score them with the rule rewards
(nanoseek.rl.rewards), normalise the rewards within each group, and take `mu` passes of `minibatches`
AdamW updates on the clipped-ratio objective with the k3 KL penalty against a frozen reference
(nanoseek.rl.grpo). Checkpoints are the training engine's (nanoseek.train.checkpoint: atomic, verified,
HF directories), and resuming is exact: the problems and sampling seeds of a step are pure functions
of (seed, step), and the weights, AdamW moments and RNG states come back from the checkpoint.

Departures from the paper, all deliberate:
* Scale: a few hundred completions per step and a model of millions of parameters on CPUs, so the
  learning rate is orders of magnitude above the paper's 3e-6 and G, prompts per step and lengths are
  small. Defaults: G = 8, 16 prompts per step, temperature 1, clip eps 0.2, beta 0.001 (the paper's).
* The reference model is the starting policy for the whole run; the paper refreshes it every 400 steps,
  which is longer than any run here.
* Advantages use the population std of the group, and zero-variance groups get advantage 0 (the
  paper's formula divides by zero there); their share is logged as `zero_var_frac`.
* Loss aggregation defaults to token-level (DAPO) instead of the paper's per-sequence mean, which
  favours short wrong answers; `aggregation = "sequence"` restores the paper's.
* Rewards: TinyZero shaping (1.0 correct and well formed, 0.1 well formed but wrong, 0 otherwise) by
  default; the paper adds accuracy and format rewards, which `reward_weights` reproduces.
* The old-policy log-probabilities come from the training forward pass, not from the sampler, so
  numerical differences between the cached and full forward cannot masquerade as ratios. A minibatch
  that no optimizer step has touched yet takes them from its own first forward (so mu = minibatches = 1
  needs no extra forward and rho is exactly 1); later minibatches get one no-grad forward before the
  first step.
* Only the main head is optimised: the MTP module (used for speculative decoding) is left as it was,
  and the routing biases are frozen (no aux-loss-free updates) so that rollouts and updates route alike.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.data.chat import render_prompt
from nanoseek.data.tasks import Task, get_task
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.rl import grpo, packed
from nanoseek.rl.rewards import accuracy_reward, combined_reward, format_reward
from nanoseek.train.head import head_log_probs


@dataclass
class GRPOConfig:
    task: str = "arithmetic"
    difficulty: int = 1
    steps: int = 50
    prompts_per_step: int = 16
    G: int = 8                       # completions per prompt (the group)
    beta: float = 0.001              # KL penalty weight
    clip_eps: float = 0.2
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    mu: int = 1                      # passes over each rollout batch (the paper's mu)
    minibatches: int = 1             # optimizer steps per pass; > 1 makes later ones off-policy (clipping acts)
    aggregation: str = "token"       # "token" (DAPO) or "sequence" (the paper's)
    reward_weights: dict[str, float] | None = None  # None = TinyZero shaping (1 / 0.1 / 0)
    seed: int = 0
    max_batch_size: int = 256        # engine slots; rollouts beyond it wait in its queue
    save_every: int = 0              # 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    dtype: str = "fp32"              # the update's and reference's autocast: fp32, bf16, or auto (bf16 on CUDA and
                                     # on CPUs with fast bf16); master weights, optimizer and rollouts stay fp32

    def validate(self) -> "GRPOConfig":
        for k in ("steps", "prompts_per_step", "G", "max_new_tokens", "mu", "minibatches", "difficulty",
                  "max_batch_size", "keep_last", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"grpo {k} must be >= 1, got {getattr(self, k)}")
        if self.G < 2:
            raise ValueError(f"grpo G must be >= 2 (advantages compare completions within a group), got {self.G}")
        if (self.prompts_per_step * self.G) % self.minibatches:
            raise ValueError(f"grpo minibatches ({self.minibatches}) must divide prompts_per_step * G "
                             f"({self.prompts_per_step * self.G})")
        if self.lr <= 0 or self.beta < 0 or self.clip_eps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grpo lr must be > 0 and beta, clip_eps, grad_clip, weight_decay >= 0")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError(f"grpo needs temperature > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(f"grpo aggregation must be one of {grpo.AGGREGATIONS}, got {self.aggregation!r}")
        if self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("grpo save_every and warmup_steps must be >= 0")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ValueError(f"grpo dtype must be fp32, bf16 or auto, got {self.dtype!r}")
        return self


@dataclass
class Rollouts:
    examples: list            # [P] problems
    prompts: list[list[int]]  # [B] prompt ids, B = P * G, each prompt's G copies consecutive
    completions: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor     # [B]
    accuracy: list[float]
    fmt: list[float]
    seconds: float


@dataclass
class GRPOState:
    step: int = 0
    completions: int = 0
    history: list[dict] = field(default_factory=list)


class GRPOTrainer:
    """Holds the policy, the frozen reference, the optimizer and one engine reused for every rollout."""

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, cfg: GRPOConfig, out_dir: str | Path | None = None,
                 tokenizer_dir: str | Path | None = None, progress: bool = True,
                 on_log: Callable[[dict], None] | None = None, task: Task | None = None):
        from nanoseek.infer import Engine, fast
        from nanoseek.train.optim import OptimConfig
        from nanoseek.train.step import TrainStep

        self.cfg = cfg.validate()
        self.model, self.tok = model, tok
        self.task = task or get_task(cfg.task)
        self.out = Path(out_dir) if out_dir is not None else None
        self.tokenizer_dir = tokenizer_dir
        self.progress, self.on_log = progress, on_log
        self.reference = None
        if cfg.beta > 0:
            # The pure modules (a model that has been through an Engine carries its decode paths, which are
            # slower than the training paths at a whole rollout batch; see reference_log_probs).
            self.reference = fast.restore(copy.deepcopy(model)).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        # The MTP head is not part of the RL objective: keep it out of the optimizer.
        for p in model.mtp.parameters():
            p.requires_grad_(False)
        # Warm-up then a constant LR (decay_frac 0); routing biases frozen (speed 0: loads measured, not applied);
        # the fused AdamW kernel (build_optimizer's default; the single-tensor loop it replaced agreed to rounding).
        self.stepper = TrainStep(model, OptimConfig.of(cfg, decay_frac=0.0), bias_update_speed=0.0, name="grpo")
        self.opt = self.stepper.opt
        longest = max(len(render_prompt(ex.prompt, tok)) for ex in self.task.examples(
            "train", 64, seed=cfg.seed, difficulty=cfg.difficulty))
        max_len = min(model.config.max_position_embeddings, 2 * longest + cfg.max_new_tokens + 16)
        self.engine = Engine(model, max_batch_size=min(cfg.max_batch_size, cfg.prompts_per_step * cfg.G),
                             max_len=max_len)
        self.max_len = max_len
        self.state = GRPOState()
        from nanoseek.device import autocast_dtype

        self.amp_device = next(model.parameters()).device.type
        self.amp_dtype = autocast_dtype(cfg.dtype, torch.device(self.amp_device))

    def autocast(self):
        """The forwards of the update (policy, old policy, reference) under grpo.dtype's autocast."""
        return torch.autocast(self.amp_device, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    # ------------------------------------------------------------------ rollouts and rewards
    def problems(self, step: int) -> list:
        return self.task.examples("train", self.cfg.prompts_per_step, seed=self.cfg.seed * 1_000_003 + step + 1,
                                  difficulty=self.cfg.difficulty)

    def reward(self, text: str, example) -> float:
        return combined_reward(text, example, self.cfg.reward_weights)

    def rollout(self, step: int) -> Rollouts:
        from nanoseek.infer import SamplingParams

        cfg, tok = self.cfg, self.tok
        t0 = time.perf_counter()
        examples = self.problems(step)
        prompts = []
        for ex in examples:
            ids = render_prompt(ex.prompt, tok)
            if len(ids) + cfg.max_new_tokens > self.max_len:
                raise ValueError(f"a prompt of {len(ids)} tokens plus max_new_tokens {cfg.max_new_tokens} exceeds "
                                 f"the rollout context of {self.max_len} tokens")
            prompts += [ids] * cfg.G
        base = (cfg.seed * 1_000_003 + step) * 65_536
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=base + i, stop_token_ids=[tok.eos_id]) for i in range(len(prompts))]
        self.model.eval()
        outs = self.engine.generate_batch(prompts, params)  # every completion of the step in one batched call
        completions = [c.token_ids for c in outs]
        texts = [tok.decode(c) for c in completions]
        exs = [ex for ex in examples for _ in range(cfg.G)]
        rewards = torch.tensor([self.reward(t, ex) for t, ex in zip(texts, exs)])
        acc = [accuracy_reward(t, ex) for t, ex in zip(texts, exs)]
        fmt = [format_reward(t, ex) for t, ex in zip(texts, exs)]
        return Rollouts(examples, prompts, completions, texts, [c.finish_reason == "length" for c in outs],
                        rewards, acc, fmt, time.perf_counter() - t0)

    # ------------------------------------------------------------------ the update
    def update(self, ro: Rollouts, step: int) -> dict:
        """mu passes of `minibatches` optimizer steps on the clipped objective; the step's mean statistics.

        Work the objective does not need is skipped, each skip computing the same loss and gradient
        (tests/test_grpo_update.py): the old-policy log-probabilities of a minibatch that no optimizer step
        has touched yet are its own first forward's (detached; so with mu * minibatches = 1 there is no
        old-policy forward at all, and otherwise only for minibatches 2..k); each minibatch runs packed
        (nanoseek.rl.packed: each group's prompt once, no padding), or, for a model that packing does not
        cover, in length buckets padded to their own longest row (grpo.length_buckets); the head scores
        only completion positions; the frozen reference runs under inference mode.
        """
        cfg = self.cfg
        dev = next(self.model.parameters()).device  # rollouts are host lists; the model may live on a GPU
        adv = grpo.group_advantages(ro.rewards, cfg.G).to(dev)
        ids, targets, mask = (t.to(dev) for t in grpo.completion_batch(ro.prompts, ro.completions, self.tok.pad_id))
        B = ids.shape[0]
        mb = B // cfg.minibatches
        lengths = [len(p) + len(c) - 1 for p, c in zip(ro.prompts, ro.completions)]
        use_packed = packed.supports(self.model) and (self.reference is None or packed.supports(self.reference))
        # Per minibatch: its micro-batches (row indices, trimmed length, the Packing or None) and the counts its
        # loss averages over.
        parts = []
        for k in range(cfg.minibatches):
            rows = range(k * mb, (k + 1) * mb)
            if use_packed:
                pk = packed.Packing.of([ro.prompts[i] for i in rows], [ro.completions[i] for i in rows], dev)
                parts.append([(torch.arange(k * mb, (k + 1) * mb, device=dev), pk.shape[1], pk)])
                continue
            buckets = grpo.length_buckets([lengths[i] for i in rows])
            parts.append([(torch.tensor([k * mb + i for i in b], device=dev), max(lengths[k * mb + i] for i in b), None)
                          for b in buckets])
        wholes = [grpo.Whole.of(mask[k * mb: (k + 1) * mb]) for k in range(cfg.minibatches)]

        def log_probs(model, part) -> torch.Tensor:
            idx, T, pk = part
            with self.autocast():
                if pk is not None:
                    return packed.packed_log_probs(model, pk).float()
                return completion_log_probs(model, ids[idx, :T], targets[idx, :T], mask[idx, :T]).float()

        t_ref = time.perf_counter()
        ref = None
        if self.reference is not None:
            ref = torch.zeros(ids.shape, device=dev)
            for part in (p for ps in parts for p in ps):
                ref[part[0], :part[1]] = frozen_log_probs(self.reference, log_probs, part)
        t_ref = time.perf_counter() - t_ref
        old = torch.zeros(ids.shape, device=dev)
        fresh = [True] * cfg.minibatches  # minibatch k not yet seen by its first forward
        if cfg.minibatches > 1:  # later minibatches come after an optimizer step: their old log-probs now
            self.model.eval()
            with torch.no_grad():
                for part in (p for ps in parts[1:] for p in ps):
                    old[part[0], :part[1]] = log_probs(self.model, part)
            fresh[1:] = [False] * (cfg.minibatches - 1)
        self.model.train()

        def step_on(k: int) -> dict:
            whole, first = wholes[k], fresh[k]
            fresh[k] = False

            def loss_fn(part) -> tuple[torch.Tensor, dict]:
                idx, T, _ = part
                m = mask[idx, :T]
                logp = log_probs(self.model, part)
                if first:  # the policy has not moved since the rollout: pi_old is this very forward
                    old[idx, :T] = logp.detach()
                loss, d = grpo.grpo_loss_tensors(logp, old[idx, :T], adv[idx], m,
                                                 ref_logp=ref[idx, :T] if ref is not None else None,
                                                 clip_eps=cfg.clip_eps, beta=cfg.beta, aggregation=cfg.aggregation,
                                                 whole=whole)
                return loss, {"loss": loss.detach(), "kl": d["kl"], "clip_frac": d["clip_fraction"],
                              "ratio": d["ratio_mean"]}

            return self.stepper(step, parts[k], loss_fn, average=False)

        recs = [step_on(k) for _ in range(cfg.mu) for k in range(cfg.minibatches)]
        self.model.eval()
        n = len(recs)
        keys = ("loss", "kl", "clip_frac", "ratio", "grad_norm", "max_vio")
        return {**{key: sum(r[key] for r in recs) / n for key in keys}, "lr": recs[-1]["lr"], "reference_s": t_ref}

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        ro = self.rollout(step)
        t1 = time.perf_counter()
        upd = self.update(ro, step)
        t_upd = time.perf_counter() - t1
        B = len(ro.completions)
        lens = [len(c) for c in ro.completions]
        return {"step": step + 1, "reward": float(ro.rewards.mean()), "accuracy": sum(ro.accuracy) / B,
                "format": sum(ro.fmt) / B, "response_length": sum(lens) / B,
                "truncated": sum(ro.truncated) / B,
                "zero_var_frac": grpo.zero_variance_fraction(ro.rewards, cfg.G), **upd,
                "rollout_s": ro.seconds, "update_s": t_upd, "completions_per_s": B / max(ro.seconds + t_upd, 1e-9),
                "sample": ro.texts[0]}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        from nanoseek.train import checkpoint as ckpt
        from nanoseek.train.optim import optimizer_state

        if self.out is None:
            return None
        st = {"kind": "grpo", "completions": self.state.completions, "grpo_config": dataclasses.asdict(self.cfg)}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.state.step, self.model,
                                    optimizer_state(self.model, self.opt), st, self.tokenizer_dir, self.cfg.keep_last)

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint under out/checkpoints; False when there is none."""
        from nanoseek.train import checkpoint as ckpt
        from nanoseek.train.metrics import read_metrics, truncate_metrics
        from nanoseek.train.optim import load_optimizer_state

        if self.out is None:
            return False
        path = ckpt.latest_valid(self.out / "checkpoints", warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        if path is None:
            return False
        model_state, optim_state, rng, state = ckpt.load_checkpoint(path)
        if state.get("kind") != "grpo":
            raise ValueError(f"{path} is not a GRPO checkpoint")
        saved = state.get("grpo_config", {})
        for key in ("task", "difficulty", "prompts_per_step", "G", "seed", "max_new_tokens", "temperature"):
            if saved.get(key) != getattr(self.cfg, key):
                print(f"warning: grpo {key} is {getattr(self.cfg, key)!r} but the checkpoint used {saved.get(key)!r}: "
                      "the resumed run will not match an uninterrupted one", file=sys.stderr)
        self.model.load_state_dict(model_state)
        load_optimizer_state(self.model, self.opt, optim_state)
        ckpt.set_rng_state(rng)
        self.state.step, self.state.completions = int(state["step"]), int(state.get("completions", 0))
        for p in ckpt.set_aside(self.out / "checkpoints", self.state.step):
            print(f"warning: set the invalid checkpoint aside as {p}", file=sys.stderr)
        metrics = self.out / "metrics.jsonl"
        truncate_metrics(metrics, self.state.step)
        self.state.history = read_metrics(metrics)
        return True

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        log_file = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "grpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            log_file = (self.out / "metrics.jsonl").open("a")
        bar = tqdm(total=cfg.steps, initial=self.state.step, desc="grpo", unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not self.progress)
        try:
            for step in range(self.state.step, cfg.steps):
                rec = self.train_step(step)
                self.state.step = step + 1
                self.state.completions += cfg.prompts_per_step * cfg.G
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}",
                                zero_var=f"{rec['zero_var_frac']:.2f}", len=f"{rec['response_length']:.0f}",
                                kl=f"{rec['kl']:.4f}", refresh=False)
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    self.state.history.append(rec)
                    if log_file is not None:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                    if self.on_log:
                        self.on_log(rec)
                if self.out is not None and (step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                    self.save()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        for p in self.model.mtp.parameters():
            p.requires_grad_(True)
        self.model.eval()
        return self.state.history



def completion_log_probs(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                         ) -> torch.Tensor:
    """log pi(targets) [B, T] at the completion positions (mask > 0), 0 elsewhere, from one forward.

    Every position runs through the blocks (completions attend to their prompt), but only completion
    positions go through the final norm and the head, whose log-probabilities come from
    nanoseek.train.head (no [B, T, V] logits kept for the backward). A model without that decomposition
    (hidden_states, norm, lm_head) is scored through model(ids).
    """
    sel = mask > 0
    if not all(hasattr(model, a) for a in ("hidden_states", "norm", "lm_head")):
        return grpo.token_log_probs(model(ids), targets) * sel
    h_BTD, _ = model.hidden_states(ids)
    lp_N = head_log_probs(model.norm(h_BTD[sel]), model.lm_head.weight, targets[sel])
    return torch.zeros(ids.shape, dtype=lp_N.dtype, device=lp_N.device).masked_scatter(sel, lp_N)


def reference_log_probs(reference: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                        ) -> torch.Tensor:
    """completion_log_probs of the frozen reference, as constants (computed under inference mode).

    The trainer keeps its reference as the pure modules (fast.restore): under inference mode those take the
    same code paths as in training (one grouped GEMM over the experts, torch's GEMMs for the linears), which
    at a whole rollout batch are faster than the decode paths an Engine swaps in (padded expert batches,
    few-row layouts). The values are the same to float rounding.
    """
    return frozen_log_probs(reference, completion_log_probs, ids, targets, mask)


def frozen_log_probs(reference: torch.nn.Module, score: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """score(reference, *args) (padded or packed log-probabilities) as constants: the reference must be
    frozen, and runs under inference mode (no autograd bookkeeping at all)."""
    if any(p.requires_grad for p in reference.parameters()):
        raise ValueError("the reference model must be frozen (no parameter requiring a gradient)")
    with torch.inference_mode():
        out = score(reference, *args)
    return out.clone()  # a normal tensor again (an inference tensor cannot be saved for a backward)


def plot_grpo(history: list[dict], out_png: str | Path) -> Path | None:
    """Reward, accuracy and format rate (top) and response length (bottom) per GRPO step."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in history]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for key, label in (("reward", "mean reward"), ("accuracy", "accuracy"), ("format", "format rate"),
                       ("zero_var_frac", "zero-variance groups")):
        ax.plot(x, [r.get(key, float("nan")) for r in history], label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GRPO rollouts (train split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.plot(x, [r.get("response_length", float("nan")) for r in history], color="tab:purple")
    ax2.set_ylabel("response tokens")
    ax2.set_xlabel("GRPO step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
