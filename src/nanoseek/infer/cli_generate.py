"""`nanoseek generate`: complete one prompt from a model directory, streaming the text to stdout."""

from __future__ import annotations

import argparse
import sys

from nanoseek.infer.engine import Engine
from nanoseek.infer.generate import LOAD_DTYPES, check_model_dir, load_model
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import ChatTokenizer

DTYPE_HELP = ("weights dtype (default: as stored, except on a CPU: bf16 loads as bf16-weights, and fp16 as float32 "
              "where bf16 is not fast); int8, int4 and bf16-weights convert the linear and expert weights at load "
              "(fp32 compute; see `nanoseek quantize`)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF deepseek_v3 layout with tokenizer files)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: a random one)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")
    add_dtype_argument(p)


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=list(LOAD_DTYPES), default=None,
                   help=DTYPE_HELP)
    p.add_argument("--int8-activations", action="store_true",
                   help="int8 / int4 weights (--dtype int8|int4 or such a checkpoint) take int8 activations too: "
                        "integer dot products, faster decoding on a CPU, logits within the activations' rounding")


def run(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    tok = ChatTokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device, args.int8_activations)
    if args.chat:
        prompt, think_opened = tok.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt, think_opened = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(args.prompt), False
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=list(tok.eos_ids))
    engine = Engine(model, max_batch_size=1, max_len=len(prompt) + args.max_tokens, speculative=args.speculative)
    stream = tok.stream(think_opened=think_opened, split_reasoning=False)
    if think_opened:
        sys.stdout.write("<think>\n")

    def on_event(req, tokens, finished):
        d = stream.feed(tokens, final=finished)
        sys.stdout.write(d.content)
        sys.stdout.flush()

    req = engine.submit(prompt, params, on_event)  # a prompt too long for the model is an EngineError
    while not req.done.is_set():
        engine.step()
    sys.stdout.write("\n")
    if args.speculative:
        print(f"[speculative acceptance {engine.stats.acceptance_rate:.1%}]", file=sys.stderr)
    return 0
