"""One GRPO step, nanoseek vs TRL's GRPOTrainer, side by side on the same model, prompts and settings.

Both sides start from the SAME random DeepSeek-V3 (the `small` preset: 4 layers, hidden 256, 16 routed
experts; vocab from a 512-token BPE trained on the built-in corpus): nanoseek saves it, transformers'
DeepseekV3ForCausalLM loads the directory for TRL. Per step each side draws the same problems (TRL reads
them in order from a dataset built from nanoseek's per-step problems, shuffle off; the benchmark checks
that TRL's prompt token ids equal nanoseek's), samples G completions of each at temperature 1 up to
`--max-new-tokens` (stopping at eos), scores them with the same reward function
(nanoseek.rl.rewards.combined_reward on the decoded completion), computes the reference log-probabilities
(KL beta > 0) and takes ONE AdamW step (mu = 1, one minibatch, TRL's num_iterations = 1), with the same
learning rate, betas (0.9, 0.95), no weight decay, grad clip 1.0, clip eps 0.2 and token-level loss
aggregation (TRL's "dapo").

`--dtype bf16` runs both updates and reference forwards under bf16 autocast, fp32 master weights (nanoseek:
grpo.dtype = "bf16"; TRL: `bf16=True`); both sample in fp32. The default is fp32 on both sides.

TRL's side runs its fastest CPU settings found here (none of them change the maths): fp32, no gradient
checkpointing (TRL's default turns it on), transformers' `generate` with the dynamic cache (no vLLM on a
CPU; TRL's other option, transformers' continuous-batching engine, fails on deepseek_v3's MLA in
transformers 5.24 with an index_copy_ shape error), `--trl-experts` as the experts implementation
(grouped_mm by default; eager is measured slower, see the README), fused AdamW (transformers' default
optimizer), no logging of completions. TRL already skips
the old-policy forward when num_iterations = 1, and scores only completion positions through its fused LM
head.

The steps alternate: a TrainerCallback runs one nanoseek step right after each TRL optimizer step, so
both see the same machine load. A "full step" is rollout (sampling + rewards) + reference forward +
update (policy forward, backward, clipping, AdamW); each side reports that breakdown. Nothing is
installed at run time: TRL comes from the venv (`pip install -e ".[bench]"`), and its versions are in the
JSON.

    python -m benchmarks.bench_grpo_trl [--prompts 8 --G 8 --max-new-tokens 64 --steps 6 --warmup 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
import warnings
from importlib.metadata import version

import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.mfu import device_name
from nanoseek.model import Transformer
from nanoseek.data.chat import render_prompt
from nanoseek.rl.rewards import combined_reward
from nanoseek.rl.trainer import GRPOConfig, GRPOTrainer

from .common import median, write_result


def cpu_model() -> str:
    return device_name(torch.device("cpu"))


def cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in have if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


class _Timer:
    """Accumulates wall time per label for the current step."""

    def __init__(self):
        self.now: dict[str, float] = {}

    def wrap(self, label: str, fn, when=None):
        @functools.wraps(fn)
        def timed(*a, **kw):
            if when is not None and not when(*a, **kw):
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.now[label] = self.now.get(label, 0.0) + time.perf_counter() - t
        return timed

    def take(self) -> dict[str, float]:
        out, self.now = self.now, {}
        return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.001)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the updates' autocast on both sides")
    ap.add_argument("--trl-experts", default="grouped_mm", help="transformers experts_implementation for TRL's model")
    args = ap.parse_args(argv)
    try:
        import datasets
        import transformers
        import trl
    except ImportError as e:
        raise SystemExit(f"bench_grpo_trl needs TRL, the reference it runs against ({e.name} is not installed): "
                         "pip install -e '.[bench]' (or make bench)") from None

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # TRL's own deprecated args
    datasets.disable_progress_bars()
    load_before = os.getloadavg()
    P, G, n_steps = args.prompts, args.G, args.warmup + args.steps
    tok = train_tokenizer(builtin_corpus(2000, seed=0), 512)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size))
    cfg = GRPOConfig(task="arithmetic", steps=n_steps, prompts_per_step=P, G=G, max_new_tokens=args.max_new_tokens,
                     beta=args.beta, lr=args.lr, clip_eps=0.2, grad_clip=1.0, weight_decay=0.0, mu=1, minibatches=1,
                     temperature=1.0, top_p=1.0, aggregation="token", dtype=args.dtype)

    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(model, d)
        tok.save(d)
        hf_kwargs = {"dtype": torch.float32, "experts_implementation": args.trl_experts}
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, **hf_kwargs)
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        ours = GRPOTrainer(model, tok, cfg, progress=False)  # deep-copies the reference before any step

        # The same problems, in the same order: step s of both sides gets ours.problems(s).
        examples = [ex for s in range(n_steps) for ex in ours.problems(s)]
        rows = [{"prompt": [{"role": "user", "content": ex.prompt}], "idx": i} for i, ex in enumerate(examples)]
        dataset = datasets.Dataset.from_list(rows)

        def reward(prompts, completions, completion_ids, idx, **_):
            return [combined_reward(tok.decode(c), examples[i]) for c, i in zip(completion_ids, idx)]
        reward.__name__ = "combined_reward"

        trl_args = trl.GRPOConfig(
            output_dir=os.path.join(d, "trl"), per_device_train_batch_size=P * G, gradient_accumulation_steps=1,
            num_generations=G, max_completion_length=args.max_new_tokens, beta=args.beta, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=1.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            temperature=1.0, top_p=1.0, top_k=0, use_cpu=True, bf16=args.dtype == "bf16", fp16=False,
            gradient_checkpointing=False, optim="adamw_torch_fused", max_steps=n_steps, logging_strategy="no",
            report_to="none", save_strategy="no", shuffle_dataset=False, seed=0, dataloader_num_workers=0,
            log_completions=False, disable_tqdm=True,
            # TRL builds its reference model from these (it warns that the policy, passed built, ignores them).
            model_init_kwargs=hf_kwargs)
        theirs = trl.GRPOTrainer(model=hf_model, reward_funcs=reward, args=trl_args, train_dataset=dataset,
                                 processing_class=hf_tok)

        # Timing probes on TRL's own methods (measurement only: they call straight through).
        timer = _Timer()
        seen_prompts: list[list[list[int]]] = []
        tokenize = theirs._tokenize_prompts

        def record_prompts(prompts):
            out = tokenize(prompts)
            seen_prompts.append([list(map(int, p)) for p in out[0]])
            return out
        theirs._tokenize_prompts = timer.wrap("rollout", record_prompts)
        theirs._calculate_rewards = timer.wrap("rollout", theirs._calculate_rewards)
        theirs._get_per_token_logps_and_entropies = timer.wrap(
            "reference", theirs._get_per_token_logps_and_entropies, when=lambda m, *a, **k: m is theirs.ref_model)
        theirs._generate_single_turn = timer.wrap("rollout", theirs._generate_single_turn)

        recs: dict[str, list[dict]] = {"nanoseek": [], "trl": []}
        prompt_match: list[bool] = []

        class Alternate(transformers.TrainerCallback):
            def on_step_begin(self, *_a, **_k):
                timer.take()
                self.t0 = time.perf_counter()

            def on_step_end(self, _args, state, *_a, **_k):
                total = time.perf_counter() - self.t0
                parts = timer.take()
                step = state.global_step - 1
                seqs = theirs._metrics["train"].get("completions/mean_length", [float("nan")])
                recs["trl"].append({"step_s": total, "rollout_s": parts.get("rollout", 0.0),
                                    "reference_s": parts.get("reference", 0.0),
                                    "mean_completion_tokens": float(seqs[-1])})
                # nanoseek's step on the same problems, between two TRL steps.
                ours_prompts = [render_prompt(ex.prompt, tok) for ex in ours.problems(step) for _ in range(G)]
                prompt_match.append(bool(seen_prompts) and seen_prompts[-1] == ours_prompts)
                t = time.perf_counter()
                rec = ours.train_step(step)
                total = time.perf_counter() - t
                recs["nanoseek"].append({"step_s": total, "rollout_s": rec["rollout_s"],
                                         "reference_s": rec["reference_s"],
                                         "mean_completion_tokens": rec["response_length"]})

        theirs.add_callback(Alternate())
        theirs.train()

    if not all(prompt_match):
        raise RuntimeError("TRL's prompt token ids differ from nanoseek's: the comparison would not be like for like")
    n = P * G
    result = {"benchmark": "grpo_vs_trl", "preset": args.preset, "params": model.num_params(), "dtype": args.dtype,
              "prompts": P, "G": G, "completions_per_step": n, "max_new_tokens": args.max_new_tokens,
              "beta": args.beta, "lr": args.lr, "timed_steps": args.steps, "warmup_steps": args.warmup,
              "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "versions": {k: version(k) for k in ("torch", "transformers", "trl", "accelerate", "datasets")},
              "trl_settings": {"experts_implementation": args.trl_experts, "gradient_checkpointing": False,
                               "optim": "adamw_torch_fused", "use_vllm": False, "dtype": "float32",
                               "bf16_autocast": args.dtype == "bf16",
                               "loss_type": "dapo", "num_iterations": 1, "generation": "transformers generate"}}
    for side, rs in recs.items():
        timed = rs[args.warmup:]
        step_s = median([r["step_s"] for r in timed])
        rollout = median([r["rollout_s"] for r in timed])
        ref = median([r["reference_s"] for r in timed])
        update = median([r["step_s"] - r["rollout_s"] - r["reference_s"] for r in timed])
        result[side] = {"step_s": step_s, "completions_per_s": n / step_s, "rollout_s": rollout,
                        "reference_s": ref, "update_s": update,
                        "mean_completion_tokens": sum(r["mean_completion_tokens"] for r in timed) / len(timed),
                        "all_step_s": [r["step_s"] for r in rs]}
    result["speedup"] = result["nanoseek"]["completions_per_s"] / result["trl"]["completions_per_s"]
    print(f"GRPO step ({args.preset}, {P} prompts x G={G}, <= {args.max_new_tokens} new tokens, beta {args.beta}, "
          f"{torch.get_num_threads()} threads, {args.dtype} updates, {cpu_model()}; load {load_before[0]:.1f})")
    for side in ("nanoseek", "trl"):
        r = result[side]
        print(f"  {side:9s} {r['completions_per_s']:6.1f} completions/s  step {r['step_s']:.2f} s = rollout "
              f"{r['rollout_s']:.2f} + reference {r['reference_s']:.2f} + update {r['update_s']:.2f}  "
              f"({r['mean_completion_tokens']:.1f} tokens/completion)")
    print(f"  nanoseek / TRL: {result['speedup']:.2f}x per full step")
    print("wrote", write_result("grpo_trl" if args.dtype == "fp32" else f"grpo_trl_{args.dtype}", result))
    return result


if __name__ == "__main__":
    main()
