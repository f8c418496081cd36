"""`onn-export`: write a self-contained model folder of a training run, for inference.

    onn-export DIR OUT [--step K]   (or --workdir DIR --out OUT) [--format orbax|safetensors|npz] [--tokenizer PATH]
               [--layout as_trained|per_layer|stacked]

DIR is a training workdir (its checkpoints/ folder is used) or a checkpoint folder itself;
the latest step is exported unless --step. OUT (new or empty) receives the parameters
(params/ orbax, model.safetensors or params.npz), config.json, the tokenizer (tokenizer.json
copied in, and tokenizer_config.json with its special ids and templates; --layout converts the
blocks between the per-layer and the stacked (model.scan_layers) layout), a model card
README.md and export.json (see onn_jax.io.portable). --tokenizer names the tokenizer.json to
copy when the one the run used has moved. `onn-generate --workdir OUT` and
onn_jax.load_export read it from any path. The export is written into a hidden folder beside
OUT and renamed to OUT when complete. Errors exit with code 2 (bad input, checked before
anything is written), 4 when writing failed (disk full, I/O error, in any format: one line;
the folder beside OUT is removed, OUT and everything else in its parent are untouched).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from train.common.trained_model import quiet_orbax
from train.common.workdir_check import CHECKPOINT_DIR


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="onn-export", description="Export the params of a checkpoint.")
    parser.add_argument("paths", nargs="*", metavar="DIR OUT",
                        help="training workdir (or its checkpoints/ folder), then the new export directory")
    parser.add_argument("--workdir", default=None, metavar="DIR", help="the training workdir (instead of DIR)")
    parser.add_argument("--out", default=None, metavar="OUT", help="the export directory (instead of OUT)")
    parser.add_argument("--step", type=int, default=None, metavar="K", help="checkpoint step (default: latest)")
    parser.add_argument("--format", default="orbax", choices=("orbax", "safetensors", "npz"),
                        help="parameter file format (default orbax)")
    parser.add_argument("--layout", default="as_trained", choices=("as_trained", "per_layer", "stacked"),
                        help="the blocks' parameter layout: as trained (default), per_layer (block_i/...) "
                             "or stacked (blocks/... with a layer axis, model.scan_layers=true)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer.json to copy in (default: the one the run was trained with)")
    args = parser.parse_args(argv)
    given = list(args.paths)
    args.dir = args.workdir or (given.pop(0) if given else None)
    args.out = args.out or (given.pop(0) if given else None)
    if args.dir is None or args.out is None or given:
        parser.error("give the training workdir and the export directory: onn-export DIR OUT "
                     "(or --workdir DIR --out OUT)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from train.common.signals import run_program
    return run_program(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    src = Path(args.dir)
    if not src.is_dir():
        print(f"onn-export: error: {src}: no such directory", file=sys.stderr)
        return 2
    from train.common.cli_checks import export_args
    problem = export_args(args)
    if problem:
        print(f"onn-export: error: {problem}", file=sys.stderr)
        return 2
    quiet_orbax()
    quiet_orbax_errors()
    if (src / CHECKPOINT_DIR).is_dir():
        src = src / CHECKPOINT_DIR
    from onn_jax.io.errors import CheckpointError, ExportWriteError  # heavy: after the cheap checks
    from onn_jax.io.portable import write_export
    try:
        step = write_export(src, args.out, args.step, fmt=args.format, tokenizer=args.tokenizer,
                            layout=args.layout)
    except CheckpointError as e:
        print(f"onn-export: error: {e}", file=sys.stderr)
        return 2
    except ExportWriteError as e:  # a full disk, an I/O error: written beside OUT, removed again
        print(f"onn-export: error: {e}", file=sys.stderr)
        return 4
    print(f"exported step {step} of {src} to {Path(args.out).resolve()} ({args.format}; "
          f"see its README.md)")
    return 0


def quiet_orbax_errors() -> None:
    """Drops orbax's own error log records (absl, with tracebacks, from its writer threads): a
    failed write is reported once, in onn-export's error line."""
    import logging
    logging.getLogger("absl").addFilter(lambda r: "orbax" not in (r.pathname or ""))

if __name__ == "__main__":
    sys.exit(main())
