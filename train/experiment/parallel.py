"""onn-experiment --parallel N: up to N cells at once, each an onn-experiment process of its own.

Why: a small model's step is launch-bound, so one process leaves a GPU (or a many-core CPU) mostly
idle; several cells sharing the device finish a grid sooner (gpu_small on one H200: six at once
gave ~3x one process's throughput, docs/RESEARCH.md). Each cell runs as

    python -m train.experiment FILE --only LABEL --seeds SEED --out OUT/cells/LABEL_seedSEED --cell-only

(the parent's --steps, --compile-cache and --config overrides passed on; its output in
OUT/cells/LABEL_seedSEED.log), so no two processes write one results.jsonl. The parent decides
which cells run (train.experiment.grid.run_experiment), and when a cell's process ends well moves its
run directory to OUT/runs/LABEL/seed_SEED and writes its row. A cell whose process fails is
named with its exit code and log, the others go on; the parent then stops with an error. On a
GPU, children get XLA_PYTHON_CLIENT_PREALLOCATE=false unless it is set: each would otherwise
reserve 75% of the device's memory. `gpus` (onn-experiment --gpus 0,1,2,3) spreads the cells
over several GPUs of a host: each cell sees one (CUDA_VISIBLE_DEVICES), the one running the
fewest cells when it starts.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

POLL_S = 0.2


@dataclasses.dataclass(frozen=True)
class ParallelCells:
    experiment_file: str
    jobs: int
    cli_overrides: Sequence[tuple[str, str]] = ()
    steps: int | None = None
    compile_cache: str | None = None  # a directory, "none", or None (each cell's own default)
    gpus: Sequence[str] = ()          # CUDA device ids to spread the cells over; () = leave as is

    def command(self, label: str, seed: int, cell_out: Path) -> list[str]:
        """The onn-experiment command line that runs one cell into cell_out."""
        cmd = [sys.executable, "-m", "train.experiment", self.experiment_file, "--only", label,
               "--seeds", str(seed), "--out", str(cell_out), "--cell-only"]
        if self.compile_cache is not None:
            cmd += ["--compile-cache", self.compile_cache]
        if self.steps is not None:
            cmd += ["--steps", str(self.steps)]
        return cmd + [f"--config.{key}={value}" for key, value in self.cli_overrides]

    def run(self, cells: Sequence[tuple], out: Path, read_row: Callable[[Path], dict | None],
            on_done: Callable[[tuple, dict, Path], None], log: Callable[[str], None]) -> list[str]:
        """Runs cells ((label, seed, ...) tuples), at most `jobs` at once, in the given order;
        calls on_done(cell, row, the run directory in the cell's output) as each one ends well
        (read_row(cell output) gives its row, None if it has none). Returns the failed cells."""
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        queue, running, failed = list(cells), {}, []
        try:
            self._loop(queue, running, failed, out, env, read_row, on_done, log)
        finally:  # an interrupted parent (Ctrl-C, an error) leaves no cell process behind
            for proc, (_, _, log_file, _, _) in running.items():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log_file.close()
        return failed

    def _loop(self, queue, running, failed, out, env, read_row, on_done, log) -> None:
        """Starts cells while there is room, and hands each ended one to on_done (or failed)."""
        while queue or running:
            while queue and len(running) < self.jobs:
                cell = queue.pop(0)
                label, seed = cell[0], cell[1]
                cell_out = out / "cells" / f"{label}_seed{seed}"
                cell_out.mkdir(parents=True, exist_ok=True)
                log_path = cell_out.parent / f"{label}_seed{seed}.log"
                log_file = open(log_path, "w")
                gpu = min(self.gpus, key=lambda g: sum(r[4] == g for r in running.values())) if self.gpus else None
                cell_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
                proc = subprocess.Popen(self.command(label, seed, cell_out), stdout=log_file,
                                        stderr=subprocess.STDOUT, env=cell_env)
                running[proc] = (cell, cell_out, log_file, log_path, gpu)
            time.sleep(POLL_S)
            for proc in [p for p in running if p.poll() is not None]:
                cell, cell_out, log_file, log_path, _ = running.pop(proc)
                log_file.close()
                row = read_row(cell_out) if proc.returncode == 0 else None
                if row is None:
                    failed.append(f"{cell[0]} seed {cell[1]} (exit code {proc.returncode}; log {log_path})")
                    log(f"cell {failed[-1]} failed")
                    continue
                on_done(cell, row, cell_out / "runs" / cell[0] / f"seed_{cell[1]}")
