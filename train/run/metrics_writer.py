"""Run outputs: metrics.jsonl (one JSON object per logged step) and TensorBoard events.

The row format and its reader are train.common.metrics_file. A resumed run appends; rows with
a step at or beyond the resume step are dropped first so the file stays one row per step (the
run restarts from its last checkpoint, not its last log). Processes other than 0 of a
multi-process run write nothing (NullWriter).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from train.common.metrics_file import read_metrics, to_jsonable
from train.common.workdir_check import METRICS_FILE, TB_DIR


def mean_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Element-wise mean of metric dicts (host arrays) over logged steps; keys of the first row."""
    rows = list(rows)
    if not rows:
        return {}
    return {k: np.mean(np.stack([np.asarray(r[k], np.float64) for r in rows if k in r]), axis=0)
            for k in rows[0]}


class LogWriteError(OSError):
    """metrics.jsonl or the TensorBoard events could not be written (a full disk, an I/O error);
    `cause` is the OSError."""

    def __init__(self, cause: OSError):
        super().__init__(cause.errno, cause.strerror, cause.filename)
        self.cause = cause


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard (scalars, histograms). Writing
    raises LogWriteError (an OSError) when the disk refuses."""

    def __init__(self, workdir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep rows before the resume point only
            kept = ([r for r in read_metrics(workdir, torn_tail_ok=True) if r.get("step", 0) < resume_step]
                    if resume_step else [])
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # atomic: a kill never leaves it half rewritten
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # lazy: heavy import
            except ImportError:  # a bare accelerator image: metrics.jsonl still has everything
                print("warning: tensorboardX is not installed; no TensorBoard events written", flush=True)
            else:
                self._tb = SummaryWriter(str(Path(workdir) / TB_DIR), purge_step=resume_step or None)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one row (step + wall time + metrics) and returns it as written."""
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: to_jsonable(v) for k, v in metrics.items()})
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            if self._tb is not None:
                self._write_tb(step, metrics)
        except OSError as e:
            raise LogWriteError(e) from None
        return row

    def _write_tb(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            arr = np.asarray(value)
            if arr.ndim == 0 and np.issubdtype(arr.dtype, np.number):
                self._tb.add_scalar(key, float(arr), step)
            elif key.endswith(("expert_load", "head_load")) and arr.ndim == 2:  # [L, E|H]: scalars, image, histogram
                unit = "expert" if key.endswith("expert_load") else "head"
                for layer, row in enumerate(arr):
                    self._tb.add_histogram(f"{key}/layer_{layer}", row, step)
                    self._tb.add_scalars(f"{key}/layer_{layer}", {f"{unit}_{e}": float(v) for e, v in enumerate(row)},
                                         step)
                self._tb.add_image(key, load_image(arr), step, dataformats="HW")
            elif key.endswith("slot_load") and arr.ndim == 1:  # [M] slots (often 256): image and histogram
                self._tb.add_histogram(key, arr, step)
                self._tb.add_image(key, load_image(arr[None]), step, dataformats="HW")
            elif arr.ndim == 1 and np.issubdtype(arr.dtype, np.number) and arr.size <= 256:
                names = metrics.get("eval/domain_names") if key.startswith("eval/domain_") else None
                names = names if isinstance(names, (list, tuple)) and len(names) == arr.size else None
                unit = "layer" if key.endswith(("dead_experts", "surprise_zero_frac")) else \
                    "expert" if key.endswith("thresholds") else "i"
                for i, v in enumerate(arr):
                    if np.isfinite(v):
                        self._tb.add_scalar(f"{key}/{names[i] if names else f'{unit}_{i}'}", float(v), step)
            elif key == "moe/thresholds" and arr.ndim == 2:  # [L, E] sigmoid(theta)
                for layer, row in enumerate(arr):
                    self._tb.add_scalars(f"{key}/layer_{layer}", {f"expert_{e}": float(v) for e, v in enumerate(row)},
                                         step)
            elif key.endswith("surprise_hist") and arr.ndim == 2:
                edges = np.asarray(metrics.get(key.replace("surprise_hist", "surprise_edges")))
                if edges.ndim == 1 and edges.size == arr.shape[1] + 1:
                    for layer, counts in enumerate(arr):
                        total = float(counts.sum())
                        if total > 0:
                            mid = np.sqrt(edges[:-1] * edges[1:])
                            self._tb.add_histogram_raw(
                                f"{key}/layer_{layer}", min=float(edges[0]), max=float(edges[-1]),
                                num=total, sum=float((counts * mid).sum()),
                                sum_squares=float((counts * mid ** 2).sum()),
                                bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                                global_step=step)
        self._tb.flush()

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            try:
                self._tb.add_text(tag, text, step)
                self._tb.flush()
            except OSError as e:
                raise LogWriteError(e) from None

    def close(self) -> None:
        """Closes the files (idempotent); LogWriteError if what was buffered cannot be written."""
        failed = None
        for close in (self._file.close, self._tb.close if self._tb is not None else None):
            try:
                if close is not None:
                    close()
            except OSError as e:
                failed = failed or e
        self._tb = None
        if failed is not None:
            raise LogWriteError(failed)


def load_image(load_LxE) -> np.ndarray:
    """An [L * 8, E * 8] grey image of the expert load (white = the largest load), for TensorBoard."""
    a = np.asarray(load_LxE, np.float64)
    a = a / max(float(a.max()), 1e-12)
    return np.kron(a, np.ones((8, 8))).astype(np.float32)


class NullWriter:
    """The writer of processes other than 0 in a multi-process run: only process 0 writes the
    workdir's logs; the others compute the same rows and drop them."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: to_jsonable(v) for k, v in metrics.items()})
        return row

    def add_text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass
