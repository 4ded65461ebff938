"""`nanoseek train`: pretrain from a TOML run config (nanoseek.train.config), single process or under torchrun.

Exit status: 0 done, 1 stopped on a NaN/inf loss (nothing saved after it), 2 bad config, arguments or
checkpoint (one line, from nanoseek.cli), 130 interrupted (resume with --resume).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML run config ([model], [data], [train], [moe], [mtp], "
                        "[parallel], [fp8]); see configs/tiny.toml")
    parser.add_argument("--out", required=True, help="run folder: tokenizer, data, checkpoints, metrics, final model")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=30 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar: each logged step as a line")


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.config import load_run_config
    from nanoseek.train.loop import train
    from nanoseek.train.step import NonFiniteLoss

    cfg = load_run_config(args.config, args.sets)
    try:
        final = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLoss as e:
        e.hint = "stopped; no checkpoint was written after it"
        raise
    except KeyboardInterrupt:
        print("nanoseek train: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    print(f"done: {final}")
    return 0
