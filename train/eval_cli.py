"""`onn-eval`: evaluate a checkpoint or an onn-export on held-out or user data, without training.

    onn-eval --workdir DIR [--step N] [--config.data.FIELD=VALUE ...] [--split held_out|all]
             [--batches N] [--out FILE]

DIR is a training workdir (the latest checkpoint unless --step; the config stored with that
checkpoint) or an `onn-export` directory (its config; its tokenizer). The data is the run's
`data` section, changed by --config.data.* overrides (e.g. --config.data.source=my.jsonl for
your own records). --split held_out (default) evaluates the held-out split exactly as training's
evals do (data.eval_fraction of the records); --split all evaluates every record of
data.source (user data; not for shards). --batches limits the number of eval batches (default:
the whole split). The metrics are train.run.evaluate's (eval/main_loss, eval/main_acc,
eval/domain_loss per domain, expert load, avg_k, gate accuracy, Surprise histogram, ...),
printed as one JSON object and, with --out, written to FILE (not inside DIR). Nothing in DIR
is written. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from train.common.config_loader import ConfigLoadError, apply_overrides, build_config, split_overrides, with_defaults
from train.common.trained_model import ModelLoadError, load_model, quiet_orbax
from train.common.workdir_check import CHECKPOINT_DIR, CONFIG_FILE

PROG = "onn-eval"


class EvalError(RuntimeError):
    """Bad input; the message is the one line onn-eval prints."""


def parse_args(argv: Sequence[str]):
    overrides, rest = split_overrides(list(argv))
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate a checkpoint or an export (no training).",
                                     epilog="Change the data with --config.data.FIELD=VALUE, e.g. "
                                            "--config.data.source=my.jsonl --split all.")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="training workdir (config.json, checkpoints/) or an onn-export directory")
    parser.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: latest)")
    parser.add_argument("--split", default="held_out", choices=("held_out", "all"),
                        help="held_out: the run's eval split (default); all: every record of data.source")
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="evaluate at most N batches (default: the whole split)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON to FILE")
    args = parser.parse_args(rest)
    for key, value in overrides:
        if not key.startswith("data."):
            raise EvalError(f"--config.{key}={value}: onn-eval takes only --config.data.* overrides "
                            "(the model is the checkpoint's)")
    return args, overrides


def check_args(args) -> None:
    """The flags that need no loading: --step, --batches, --out (a new or plain file outside DIR)."""
    if args.step is not None and args.step < 0:
        raise EvalError(f"--step {args.step}: must be >= 0")
    if args.batches is not None and args.batches < 1:
        raise EvalError(f"--batches {args.batches}: must be >= 1")
    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise EvalError(f"--workdir {workdir}: no such directory")
    if args.out is not None:
        out = Path(args.out).resolve()
        if out.is_dir():
            raise EvalError(f"--out {args.out}: is a directory; give a file name")
        if not out.parent.is_dir():
            raise EvalError(f"--out {args.out}: directory {out.parent} does not exist")
        if out.is_relative_to(workdir.resolve()):
            raise EvalError(f"--out {args.out}: is inside --workdir {workdir}; onn-eval writes nothing there")


def saved_config(workdir: Path, step: int) -> tuple[dict, str]:
    """The whole config dict the model was trained with (export.json's, the checkpoint's
    metadata, else the workdir's config.json) and where it came from."""
    from onn_jax import io as ckpt_lib
    from onn_jax.io import portable
    if portable.is_export(workdir):
        path = workdir / ckpt_lib.EXPORT_META
        return json.loads(path.read_text()).get("config") or {}, str(path)
    ckpt = ckpt_lib.Checkpointer(workdir / CHECKPOINT_DIR, read_only=True)
    try:
        raw = ckpt.restore_meta(step).get("config")
    finally:
        ckpt.close()
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        return raw, f"{workdir / CHECKPOINT_DIR}/{step}"
    path = workdir / CONFIG_FILE
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read the run's config: {e}") from e


def eval_data(cfg, split: str):
    """(dataset, its eval batches) of cfg.data for `split`."""
    from onn_jax.data.dataset import eval_batches
    from train.run.data import build_dataset
    from train.run.errors import TrainError
    d = cfg.data
    if split == "all":
        if d.source == "builtin" or d.source.startswith("shards:"):
            raise EvalError(f"--split all: evaluates user records (--config.data.source=FILE.jsonl); "
                            f"data.source is {d.source!r}")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, eval_fraction=0.0))
    try:
        ds = build_dataset(cfg)
    except TrainError as e:
        raise EvalError(str(e)) from e
    if split == "all":
        return ds, eval_batches(ds.train, d.batch_size, ds.tokenizer.pad_id)
    return ds, ds.eval_batches(d.batch_size)


def plain(value: Any) -> Any:
    """JSON-ready: arrays as lists, NaN / inf as null."""
    import numpy as np
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
        return [plain(v) for v in value]
    v = value.item() if hasattr(value, "item") else value
    return None if isinstance(v, float) and not math.isfinite(v) else v


@functools.lru_cache(maxsize=4)
def eval_step(model_cfg, num_domains: int):
    """train.run.evaluate's jitted eval step, kept for repeated calls in one process (compiled once)."""
    from train.run.evaluate import make_eval_step
    return make_eval_step(model_cfg, num_domains)


def run(args, overrides) -> dict:
    import itertools

    from train.run.evaluate import evaluate
    workdir = Path(args.workdir)
    try:
        params, model_cfg, tok_name, step = load_model(workdir, args.step)
    except ModelLoadError as e:
        raise EvalError(str(e)) from e
    raw, where = saved_config(workdir, step)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise EvalError(f"{where}: no config with a model section")
    given = dict(overrides)
    raw = {**with_defaults(raw), "model": raw["model"]}
    if "data.tokenizer" not in given:  # the tokenizer the model came with (an export carries its own)
        raw["data"] = {**raw["data"], "tokenizer": tok_name}
    try:
        cfg = build_config(apply_overrides(raw, overrides, where), where, overrides)
    except ConfigLoadError as e:
        raise EvalError(str(e)) from e
    cfg = dataclasses.replace(cfg, model=model_cfg)
    ds, batches = eval_data(cfg, args.split)
    if args.batches is not None:
        batches = itertools.islice(batches, args.batches)
    metrics = evaluate(eval_step(model_cfg, len(ds.domains)), params, batches)  # params: with router state
    if not metrics:
        raise EvalError(f"the {args.split} split of data.source {cfg.data.source!r} holds no records "
                        "(raise --config.data.eval_fraction, or use --split all)")
    return {"workdir": str(workdir.resolve()), "step": int(step), "split": args.split,
            "data": {"source": cfg.data.source, "tokenizer": cfg.data.tokenizer, "seq_len": cfg.data.seq_len,
                     "batch_size": cfg.data.batch_size, "eval_fraction": cfg.data.eval_fraction},
            "domains": list(ds.domains), "metrics": plain(metrics)}


def main(argv: Sequence[str] | None = None) -> int:
    from train.common.signals import run_program
    return run_program(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        check_args(args)
        quiet_orbax()
        result = run(args, overrides)
        if args.out is not None:
            from onn_jax.io.portable import write_json
            try:
                write_json(args.out, result)
            except OSError as e:
                raise EvalError(f"--out {args.out}: cannot write: {e.strerror or e}") from e
    except (EvalError, ConfigLoadError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
