"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, progress bar.

metrics.jsonl rows look like {"step": 120, "time": 1732620000.0, "train/main_loss": 2.1,
"moe/expert_load": [[...], ...], ...}: namespaced keys, arrays as (nested) lists. A resumed
run appends; rows with a step at or beyond the resume step are dropped first so the file
stays one row per step (the run restarts from its last checkpoint, not its last log).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
# Gated heads (model.heads) and slot embedding (model.embed.kind=slots): active units per token and
# the gate accuracy over tokens with a non-constant S row (pooled over layers; absent under top-k).
# A run without them has no attn/* or embed/* metrics, so its bar is unchanged.
UNIT_PROGRESS_KEYS = (("attn/avg_k", "attn_k"), ("attn/gate_acc_informative", "attn_acc_inf"),
                      ("embed/avg_k", "emb_k"), ("embed/gate_acc_informative", "emb_acc_inf"))
# Keys shown in the progress bar (and the plain log line), with their short labels. The routing
# numbers are the ones a collapse does not inflate (onn_jax.core.routing_metrics); the
# original's `moe/gate_acc` stays in metrics.jsonl only. `eval` is the latest eval loss.
PROGRESS_KEYS = (("train/main_loss", "loss"), ("eval/main_loss", "eval"),
                 ("moe/gate_acc_informative", "gate_acc_inf"), ("moe/dead_experts", "dead"),
                 ("moe/load_cv", "load_cv"), ("moe/router_entropy", "H"), ("moe/fallback_share", "fallback"),
                 ("moe/target_inactive", "tgt_inactive"), ("moe/avg_k", "avg_k"),
                 *UNIT_PROGRESS_KEYS,
                 ("train/grad_norm", "gnorm"), ("train/lr", "lr"), ("perf/tokens_per_sec", "tok/s"),
                 ("perf/mfu", "mfu"))


def progress_fields(metrics: Mapping[str, Any], latest_eval: float | None = None) -> dict[str, str]:
    """The bar's labelled values: scalars with 3 decimals (lr in %.1e, tok/s whole), the dead
    experts per layer as a/b/c, and the latest eval loss even on rows without an eval."""
    post = {}
    for key, label in PROGRESS_KEYS:
        v = metrics.get(key)
        if key == "eval/main_loss" and v is None:
            v = latest_eval
        if v is None:
            continue
        if key == "moe/dead_experts" and np.ndim(v) == 1:
            post[label] = "/".join(str(int(x)) for x in np.asarray(v))
        elif np.ndim(v) == 0 and isinstance(np.asarray(v).item(), (int, float)):
            v = float(v)
            post[label] = (f"{v:.3f}" if key == "perf/mfu" else f"{v:.0f}" if key.startswith("perf/")
                           else f"{v:.1e}" if key == "train/lr" else f"{v:.3f}")
    return post


def to_jsonable(value: Any) -> Any:
    """Numbers and arrays -> JSON values (floats, nested lists); NaN/inf -> None."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        if isinstance(item, float) and not math.isfinite(item):
            return None
        return item
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
        return [to_jsonable(v) for v in arr] if not np.all(np.isfinite(arr)) else arr.tolist()
    return arr.tolist()


def mean_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Element-wise mean of metric dicts (host arrays) over logged steps; keys of the first row."""
    rows = list(rows)
    if not rows:
        return {}
    return {k: np.mean(np.stack([np.asarray(r[k], np.float64) for r in rows if k in r]), axis=0)
            for k in rows[0]}


def read_jsonl(path: str | Path, torn_tail_ok: bool = False, numbered: bool = False) -> list[Any]:
    """The JSON values of a .jsonl file, one a line (empty if the file does not exist).

    torn_tail_ok: drop a malformed last line without its newline (a write cut by a kill).
    numbered: return (line number, value) pairs. Any other malformed line raises ValueError
    naming `path:line`."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail_ok and n == len(lines) and not text.endswith("\n"):
                    break
                raise ValueError(f"{path}:{n}: malformed JSON line: {e}") from None
            rows.append((n, value) if numbered else value)
    return rows


def read_metrics(workdir: str | Path, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """All rows of WORKDIR/metrics.jsonl (empty if the file does not exist); see read_jsonl."""
    return read_jsonl(Path(workdir) / METRICS_FILE, torn_tail_ok)


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard (scalars, histograms)."""

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
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._write_tb(step, metrics)
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
            self._tb.add_text(tag, text, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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


class Progress:
    """tqdm bar over the steps, its postfix showing PROGRESS_KEYS of the latest logged row."""

    def __init__(self, total: int, initial: int, enabled: bool = True, silent: bool = False):
        self._bar, self._silent, self._eval = None, silent, None
        if enabled and not silent:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, metrics: Mapping[str, Any]) -> None:
        """Updates the bar's postfix; with the bar off, prints one plain line per logged row."""
        if isinstance(metrics.get("eval/main_loss"), (int, float)):
            self._eval = float(metrics["eval/main_loss"])
        post = progress_fields(metrics, self._eval)
        if self._bar is not None:
            self._bar.set_postfix(post, refresh=True)
        elif not self._silent and post:
            step = metrics.get("step")
            print((f"step {step}: " if step is not None else "") +
                  " ".join(f"{k}={v}" for k, v in post.items()), flush=True)

    def write(self, text: str) -> None:
        """Prints a line above the bar (or plainly when the bar is off)."""
        if self._bar is not None:
            self._bar.write(text)
        elif not self._silent:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
