"""`onn-export`: write a params-only checkpoint of a training run, for inference.

    onn-export DIR OUT [--step K]

DIR is a training workdir (its checkpoints/ folder is used) or a checkpoint folder itself;
the latest step is exported unless --step. OUT receives params/ (orbax) and export.json
(step, config, tokenizer); `onn-generate --workdir OUT` and onn_jax.checkpoint.load_params
read it. Errors exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from train.generate import CHECKPOINT_DIR, quiet_orbax


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="onn-export", description="Export the params of a checkpoint.")
    parser.add_argument("dir", metavar="DIR", help="training workdir (or its checkpoints/ folder)")
    parser.add_argument("out", metavar="OUT", help="new directory for the export")
    parser.add_argument("--step", type=int, default=None, metavar="K", help="checkpoint step (default: latest)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    src = Path(args.dir)
    if not src.is_dir():
        print(f"onn-export: error: {src}: no such directory", file=sys.stderr)
        return 2
    quiet_orbax()
    if (src / CHECKPOINT_DIR).is_dir():
        src = src / CHECKPOINT_DIR
    from onn_jax.checkpoint import CheckpointError, export_params  # heavy imports after the cheap checks
    try:
        step = export_params(src, args.out, args.step)
    except CheckpointError as e:
        print(f"onn-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {src} to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
