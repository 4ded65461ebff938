"""`nanoseek serve`: the OpenAI-compatible API and the web chat for one model directory (uvicorn).

The listening socket is bound before the model loads, so a port in use (or a host that is not this
machine's) is a one-line error at once, not after a minute of loading; uvicorn then serves on that socket.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.infer.cli_generate import add_dtype_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF deepseek_v3 layout with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else open)")
    p.add_argument("--model-name", default=None,
                   help="the id clients pass as `model` (default: the model directory's name, or its run folder's "
                        "for a run's final/ or model/: runs/speedrun/model is served as 'speedrun')")
    p.add_argument("--max-batch-size", type=int, default=16, help="concurrent sequences (rows of the running batch)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length per sequence (default: the model's, capped at 8192)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block of the paged latent cache")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--cache-blocks", type=int, default=None,
                        help="latent cache blocks in the pool (default: max-batch-size sequences of max-len tokens)")
    budget.add_argument("--cache-memory", type=parse_bytes, default=None, metavar="SIZE",
                        help="latent cache budget in bytes, e.g. 2GiB or 500MB (instead of --cache-blocks)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse cached prompt prefixes (every prompt is computed in full)")
    add_dtype_argument(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level")


def served_model_name(model_dir: Path) -> str:
    """The default `model` id: the directory's name, or its run folder's name when the directory is the
    final/ or model/ that nanoseek's commands write (runs/speedrun/model -> "speedrun")."""
    d = Path(os.path.abspath(model_dir))  # the path as given (a symlinked run folder keeps its name)
    return d.parent.name if d.name in ("final", "model") and d.parent.name else d.name


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port, or a NanoseekError that says why not (port in use, no such host)."""
    where = f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise NanoseekError(f"--port {port} is not a TCP port", hint="use 1-65535, e.g. --port 8000")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise NanoseekError(f"cannot resolve --host {host} ({e.strerror})", hint="pass an address of this "
                            "machine, e.g. --host 127.0.0.1 or --host 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still blocks
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise NanoseekError("the port is already in use", where,
                                "stop the server that holds it, or pass another --port") from None
        if e.errno == errno.EACCES:
            raise NanoseekError("no permission to listen on this port", where,
                                "ports below 1024 need privileges; pass e.g. --port 8000") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise NanoseekError("not an address of this machine", where,
                                "pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        raise NanoseekError(f"cannot listen ({e.strerror})", where) from None
    return sock


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '500MB', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 2GiB, 500MB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_app(args: argparse.Namespace, start_engine: bool = True):
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.generate import check_model_dir, load_model
    from nanoseek.infer.text import ChatTokenizer
    from nanoseek.serve.app import create_app

    check_model_dir(args.model)
    tokenizer = ChatTokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device, args.int8_activations)
    max_len = args.max_len or min(model.config.max_position_embeddings, 8192)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_len=max_len, max_queue=args.max_queue,
                    speculative=args.speculative, block_size=args.block_size, cache_blocks=args.cache_blocks,
                    cache_bytes=args.cache_memory, prefix_caching=not args.no_prefix_cache)
    name = args.model_name or served_model_name(Path(args.model))
    return create_app(engine, tokenizer, name, api_key=args.api_key, start_engine=start_engine)


def run(args: argparse.Namespace) -> int:
    """HTTP (uvicorn) on a helper thread, the engine's step loop on the main thread (Engine.serve_forever
    says why); SIGINT / SIGTERM end both."""
    import signal
    import threading

    import uvicorn

    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port fails at once
    app = build_app(args, start_engine=False)
    engine = app.state.nanoseek.engine
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nanoseek-http", daemon=True)
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
        sock.close()
    return 0 if server.started else 1
