"""The onn-experiment command line: flags checked, then a dry run or the grid (train.experiment.grid).
Errors (experiment file, config, flags) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from train.common.config_loader import ConfigLoadError, split_overrides
from train.experiment.grid import dry_run, run_experiment
from train.experiment.parallel import ParallelCells
from train.experiment.spec import ExperimentError, load_experiment
from train.run.errors import TrainError


def enable_compile_cache(path: Path) -> None:
    """JAX's persistent compilation cache: the seeds of one config share their compiles."""
    import jax
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="onn-experiment", description="Run a grid of configs x seeds.")
    p.add_argument("experiment", help="experiment file with get_experiment(), e.g. configs/experiments/routing.py")
    p.add_argument("--out", default=None, help="output dir (default runs/experiments/<name>)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the file's")
    p.add_argument("--only", default=None, help="comma-separated run labels to run")
    p.add_argument("--steps", type=int, default=None, help="train.steps (and both phase lengths) for every run")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache (default OUT/jax_cache; 'none': off)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and list every run's config (label, seed, overrides); train nothing, write nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N cells at once, each in a process of its own (a launch-bound small "
                        "model shares a GPU or a many-core CPU; see train/experiment/parallel.py)")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="with --parallel: comma-separated CUDA device ids; each cell sees one of them "
                        "(CUDA_VISIBLE_DEVICES), the one running the fewest cells")
    p.add_argument("--cell-only", action="store_true", help=argparse.SUPPRESS)  # a --parallel child: no report
    p.epilog = ("--config.SECTION.FIELD=VALUE overrides a config field in every run (after the "
                "experiment file's own overrides), e.g. --config.data.batch_size=4")
    try:
        cli_overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    except ConfigLoadError as e:
        print(f"onn-experiment: error: {e}", file=sys.stderr)
        return 2
    a = p.parse_args(rest)
    try:
        exp = load_experiment(a.experiment)
        exp["cli_overrides"] = cli_overrides
        only = a.only.split(",") if a.only else None
        if only and set(only) - set(exp["runs"]):
            raise ExperimentError(f"--only: unknown labels {sorted(set(only) - set(exp['runs']))}; "
                                  f"known: {list(exp['runs'])}")
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
        out = Path(a.out or Path("runs") / "experiments" / exp["name"])
        if a.parallel < 1:
            raise ExperimentError(f"--parallel must be >= 1, got {a.parallel}")
        gpus = [g.strip() for g in a.gpus.split(",")] if a.gpus else []
        if a.gpus is not None and (a.parallel < 2 or not all(g.isdigit() for g in gpus)):
            raise ExperimentError(f"--gpus needs --parallel N >= 2 and comma-separated device ids, got "
                                  f"--gpus {a.gpus!r} with --parallel {a.parallel}")
        if a.dry_run:
            print(dry_run(exp, out, seeds, only, a.steps))
            return 0
        parallel = None
        if a.parallel > 1:
            # this process only plans and merges: should it touch a GPU, it must not reserve its memory
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            cache = a.compile_cache or str(out / "jax_cache")  # one cache for every cell
            parallel = ParallelCells(a.experiment, a.parallel, cli_overrides, a.steps, cache, gpus)
        elif a.compile_cache != "none":
            enable_compile_cache(Path(a.compile_cache or out / "jax_cache"))
        try:
            run_experiment(exp, out, seeds, only, a.steps, parallel=parallel, report=not a.cell_only)
        except TrainError as e:
            raise ExperimentError(str(e)) from e
    except (ExperimentError, ConfigLoadError) as e:
        print(f"onn-experiment: error: {e}", file=sys.stderr)
        return 2
    if not a.cell_only:
        print(f"results: {out / 'results.md'}\n" + (out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
