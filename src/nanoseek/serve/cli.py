"""`nanoseek serve`: the OpenAI-compatible API and the web chat for one model directory (uvicorn)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nanoseek.infer.cli_generate import DTYPE_HELP, DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF deepseek_v3 layout with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else open)")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: directory name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="concurrent sequences (cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length per sequence (default: the model's, capped at 8192)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help=DTYPE_HELP)
    p.add_argument("--log-level", default="info")


def build_app(args: argparse.Namespace, start_engine: bool = True):
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.generate import load_model
    from nanoseek.infer.text import ChatTokenizer
    from nanoseek.serve.app import create_app

    tokenizer = ChatTokenizer(args.model)
    model = load_model(args.model, args.dtype)
    max_len = args.max_len or min(model.config.max_position_embeddings, 8192)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_len=max_len, max_queue=args.max_queue,
                    speculative=args.speculative)
    name = args.model_name or Path(args.model).resolve().name
    return create_app(engine, tokenizer, name, api_key=args.api_key, start_engine=start_engine)


def run(args: argparse.Namespace) -> int:
    """HTTP (uvicorn) on a helper thread, the engine's step loop on the main thread (Engine.serve_forever
    says why); SIGINT / SIGTERM end both."""
    import signal
    import threading

    import uvicorn

    app = build_app(args, start_engine=False)
    engine = app.state.nanoseek.engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    http = threading.Thread(target=server.run, name="nanoseek-http", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: engine.request_stop())
    http.start()
    print(f"nanoseek: serving {app.state.nanoseek.model_name!r} on http://{args.host}:{args.port}/ "
          f"(OpenAI base_url http://{args.host}:{args.port}/v1)", flush=True)
    try:
        engine.serve_forever(keep_running=http.is_alive)
    finally:
        server.should_exit = True
        http.join(timeout=30)
    return 0 if server.started else 1
