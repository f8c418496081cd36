"""`onn-train`: train a surprise-gated MoE LM from a config file.

    onn-train --config configs/default.py [--config.a.b=VALUE ...] [--workdir DIR]
    onn-train --workdir DIR [--config.train.steps=VALUE ...]    (resume with DIR's saved config)

DIR (default runs/<config name>) receives config.json, checkpoints/, metrics.jsonl, tb/ and
plots/. When DIR already holds checkpoints the run resumes from the latest one (parameters,
optimizer, step and data position), continuing up to train.steps. Without --config the run's
saved DIR/config.json is the config (overrides apply on top). A resume whose model or optim
settings differ from the checkpoint's is refused, naming the fields, unless
--allow-config-change is given; then the change is recorded in metrics.jsonl
(`config/changed_on_resume`) and in the checkpoints' metadata (`config_changes`). One trainer per DIR (a
lock file); exit code 2 for bad input (config, data, tokenizer, checkpoint, workdir), 3 when
train.max_skipped_in_a_row steps in a row were not finite, 4 when a checkpoint save failed
(e.g. disk full), 5 when a process of a multi-process run was lost (restart all of them:
they resume; train.run.peers), 128 + N after stop signal N (SIGINT 130, SIGTERM 143, SIGHUP
129; see train.common.signals).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from train.common.config_loader import ConfigLoadError, load, load_saved, split_overrides
from train.common.workdir_check import CONFIG_FILE


def parse_args(argv: Sequence[str]):
    """(argparse namespace, overrides) from the command line."""
    overrides, rest = split_overrides(list(argv))
    parser = argparse.ArgumentParser(
        prog="onn-train", description="Train a surprise-gated sparse MoE language model.",
        epilog="Override any config field with --config.SECTION.FIELD=VALUE, "
               "e.g. --config.train.steps=200 --config.model.moe.num_experts=8.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="config file with get_config(), e.g. configs/default.py; may be left out "
                             "to resume --workdir with its saved config.json")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="output directory (default runs/<config name>); resumes if it holds checkpoints")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even if model/optim settings differ from the checkpoint's (recorded)")
    args = parser.parse_args(rest)
    if args.config is None and (args.workdir is None or not (Path(args.workdir) / CONFIG_FILE).is_file()):
        parser.error("--config FILE is required (or --workdir DIR of a run with a saved config.json)")
    return args, overrides


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates from badly encoded arguments)
    written as backslash escapes, so printing the error line cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quiet_orbax_errors() -> None:
    """Drops orbax's own log records (absl), whose errors come with tracebacks: onn-train reports
    a failed save itself, in one line naming the cause."""
    logging.getLogger("absl").addFilter(lambda r: "orbax" not in (r.pathname or ""))


def main(argv: Sequence[str] | None = None) -> int:
    """onn-train's entry point; see _main for the exit codes."""
    from train.common.signals import run_program
    return run_program(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input or workdir in use (one line on stderr, no traceback),
    3 stopped after train.max_skipped_in_a_row non-finite steps (with a checkpoint), 4 a
    checkpoint save failed (disk full, I/O error), 5 a process of a multi-process run was lost,
    128 + N stopped by signal N (SIGTERM 143, SIGINT 130, SIGHUP 129) after saving the current
    step; 130 also for a KeyboardInterrupt outside the loop. Rerunning resumes from the last
    committed checkpoint."""
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = (load(args.config, overrides) if args.config is not None
               else load_saved(Path(args.workdir) / CONFIG_FILE, overrides))
    except ConfigLoadError as e:
        print(printable(f"onn-train: config error: {e}"), file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    from train.common.signals import StopOnSignal
    from train.run.data import vocab_from_tokenizer
    from train.run.errors import SaveFailed, StoppedBySignal, TrainError, TrainStopped
    from train.run.loop import train
    from train.run.peers import Peers
    quiet_orbax_errors()
    if "model.vocab_size" not in {key for key, _ in overrides}:
        from onn_jax.config import ConfigError
        try:
            cfg = vocab_from_tokenizer(cfg)  # a tokenizer.json sets the vocabulary size
        except ConfigError as e:  # a field checked against vocab_size (model.output.cutoffs)
            print(printable(f"onn-train: config error: {e} (model.vocab_size is the tokenizer's "
                            f"{cfg.data.tokenizer})"), file=sys.stderr)
            return 2
    peers = Peers(cfg, workdir)
    try:
        peers.join()  # no-op for one process; joins a multi-host launch otherwise (bounded)
    except ValueError as e:
        print(f"onn-train: distributed launch error: {e}", file=sys.stderr)
        return 2
    try:
        with StopOnSignal():
            train(cfg, workdir, allow_config_change=args.allow_config_change)
        code = 0
    except (StoppedBySignal, SaveFailed, TrainError, TrainStopped, KeyboardInterrupt) as e:
        peers.hold()  # several processes: this one ends by itself; no second line from the watchdog
        code = _report(e, workdir, several=peers.multi)
    except Exception as e:
        peers.crashed(e)  # several processes: names the lost peer (or the error) and ends the process
        raise
    return peers.end(code)  # several processes: shut down (0) or leave (else) together


def _report(e: BaseException, workdir: Path, several: bool = False) -> int:
    """The error line of a run that ended early, and its exit code (see _main)."""
    from train.run.errors import SaveFailed, StoppedBySignal, TrainError, TrainStopped
    if isinstance(e, StoppedBySignal):
        print(f"onn-train: {e}", file=sys.stderr, flush=True)
        if e.hard and not several:  # a save thread is stuck: the interpreter's exit would wait for it
            sys.stdout.flush()
            os._exit(e.code)
        return e.code  # several processes: Peers.end leaves together, then ends with os._exit
    if isinstance(e, SaveFailed):
        print(f"onn-train: error: {e}", file=sys.stderr)
        return 4
    if isinstance(e, TrainError):
        print(printable(f"onn-train: error: {e}"), file=sys.stderr)
        return 2
    if isinstance(e, TrainStopped):
        print(f"onn-train: stopped: {e}", file=sys.stderr)
        return 3
    print(f"\nonn-train: interrupted; rerun the same command to resume from the last checkpoint "
          f"in {workdir / 'checkpoints'}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
