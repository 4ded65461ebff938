"""`nanoseek chat`: a terminal chat. Answers stream as they are generated; the reasoning (the `<think>`
block of R1-style models) is shown dimmed; `/reset` starts over, `/exit` (or Ctrl-D) quits."""

from __future__ import annotations

import argparse
import sys

from nanoseek.infer.cli_generate import add_dtype_argument
from nanoseek.infer.engine import Engine
from nanoseek.infer.generate import check_model_dir, load_model
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import ChatTokenizer

HELP = "commands: /reset (new conversation), /exit (quit)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF deepseek_v3 layout with tokenizer files)")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per reply at most (fewer when the "
                   "conversation leaves less room in the context)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, as DeepSeek-R1 recommends; "
                   "0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this")
    p.add_argument("--system", default=None, help="a system prompt (default: none)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler; turn i uses seed + i "
                   "(default: a random one)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")
    add_dtype_argument(p)


def run(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    # A bad --temperature/--top-p/--max-tokens fails now, not at the first turn.
    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    tok = ChatTokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device, args.int8_activations)
    engine = Engine(model, max_batch_size=1, speculative=args.speculative)
    tty = sys.stdout.isatty()
    dim, reset = ("\033[2m", "\033[0m") if tty else ("", "")
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print(f"nanoseek chat: {args.model} ({HELP})")
    turn = 0
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(base)
            print("(new conversation)")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        messages.append({"role": "user", "content": line})
        prompt, think_opened = tok.chat_prompt(messages)
        room = engine.max_len - len(prompt)
        if room < 1:
            print("(the conversation no longer fits the context: /reset)")
            messages.pop()
            continue
        params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                top_p=args.top_p, seed=None if args.seed is None else args.seed + turn,
                                stop_token_ids=list(tok.eos_ids))
        stream = tok.stream(think_opened=think_opened)
        shown = {"reasoning": False, "answer": False}

        def on_event(req, tokens, finished):
            d = stream.feed(tokens, final=finished)
            if d.reasoning:
                sys.stdout.write(dim + d.reasoning + reset)
                shown["reasoning"] = True
            if d.content:
                if shown["reasoning"] and not shown["answer"]:
                    sys.stdout.write("\n\n")
                shown["answer"] = True
                sys.stdout.write(d.content)
            sys.stdout.flush()

        req = engine.submit(prompt, params, on_event)
        try:
            while not req.done.is_set():
                engine.step()
        except KeyboardInterrupt:
            req.cancel()
            engine.step()
            print("\n(interrupted)")
        print()
        messages.append({"role": "assistant", "content": stream.content})
        turn += 1
