"""`onn-plot DIR`: draws the dashboards of a training workdir (train.plots.dashboards) into
DIR/plots/*.png and prints the files written. Exit code 2 for a bad workdir or metrics.jsonl
(one line naming the file and line), 4 when a PNG cannot be written (disk full, I/O error).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from train.plots.dashboards import PlotError, make_dashboards

DESCRIPTION = "PNG dashboards from a run's metrics.jsonl: `onn-plot DIR` writes DIR/plots/*.png."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onn-plot", description=DESCRIPTION)
    parser.add_argument("workdir", nargs="?", help="a training workdir holding metrics.jsonl")
    parser.add_argument("--workdir", dest="workdir_flag", default=None, metavar="DIR", help="the same, as a flag")
    args = parser.parse_args(argv)
    args.workdir = args.workdir_flag or args.workdir
    if args.workdir is None:
        parser.error("give the training workdir: onn-plot DIR (or --workdir DIR)")
    try:
        paths = make_dashboards(args.workdir)
    except PlotError as e:
        print(f"onn-plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing a PNG: disk full, I/O error
        print(f"onn-plot: error: cannot write {e.filename or 'the plots'}: {e.strerror or e}", file=sys.stderr)
        return 4
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
