"""GRPO throughput (completions/s): rollouts through the engine's batching vs one prompt at a time.

One GRPO step on the `small` preset (fp32 on CPU): P prompts x G completions sampled at temperature 1
(fixed length: stop tokens are disabled so both ways generate the same number of tokens), then the
clipped-objective update (nanoseek.rl.trainer.GRPOTrainer.update). "batched" is the trainer's own path:
every completion of the step in one `Engine.generate_batch` call over the latent cache. "one_by_one"
runs the same requests one at a time through an engine with a single slot (a `generate` loop). Rounds
alternate between the two; medians.

    python -m benchmarks.bench_grpo [--prompts 8 --G 8 --max-new-tokens 48 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from nanoseek.config import preset
from nanoseek.data.chat import render_prompt
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.rl.trainer import GRPOConfig, GRPOTrainer

from .common import alternate, median, write_result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = train_tokenizer(builtin_corpus(2000, seed=0), 512)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size))
    cfg = GRPOConfig(task="arithmetic", steps=1, prompts_per_step=args.prompts, G=args.G,
                     max_new_tokens=args.max_new_tokens, lr=1e-5)
    trainer = GRPOTrainer(model, tok, cfg, progress=False)
    examples = trainer.problems(0)
    prompts = [render_prompt(ex.prompt, tok) for ex in examples for _ in range(args.G)]
    params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=1.0, seed=i) for i in range(len(prompts))]
    single = Engine(model, max_batch_size=1, max_len=trainer.max_len)
    n = len(prompts)

    def batched() -> None:
        model.eval()
        trainer.engine.generate_batch(prompts, params)

    def one_by_one() -> None:
        model.eval()
        for p, sp in zip(prompts, params):
            single.generate_batch([p], sp)

    times = alternate({"batched": batched, "one_by_one": one_by_one}, rounds=args.rounds)
    # The update on one rollout batch (same for both ways of sampling).
    ro = trainer.rollout(0)
    upd = []
    for i in range(args.rounds):
        t = time.perf_counter()
        trainer.update(ro, i)
        upd.append(time.perf_counter() - t)
    t_upd = median(upd)
    res = {"preset": args.preset, "params": model.num_params(), "completions_per_step": n,
           "tokens_per_completion": args.max_new_tokens, "threads": torch.get_num_threads(),
           "update_s": t_upd}
    for name, ts in times.items():
        t = median(ts)
        res[name] = {"rollout_s": t, "rollout_completions_per_s": n / t,
                     "rollout_tokens_per_s": n * args.max_new_tokens / t,
                     "step_completions_per_s": n / (t + t_upd)}
    res["speedup_rollout"] = res["batched"]["rollout_completions_per_s"] / res["one_by_one"]["rollout_completions_per_s"]
    res["speedup_step"] = res["batched"]["step_completions_per_s"] / res["one_by_one"]["step_completions_per_s"]
    path = write_result("grpo", res)
    print(f"{args.preset}: {n} completions x {args.max_new_tokens} tokens per GRPO step")
    for name in ("batched", "one_by_one"):
        r = res[name]
        print(f"  {name:10s} rollout {r['rollout_s']:.2f} s ({r['rollout_completions_per_s']:.1f} completions/s), "
              f"step incl. update {r['step_completions_per_s']:.1f} completions/s")
    print(f"  update {t_upd:.2f} s; batching speedup: rollout x{res['speedup_rollout']:.1f}, step x{res['speedup_step']:.1f}")
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
