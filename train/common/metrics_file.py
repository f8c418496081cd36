"""metrics.jsonl, the run's log: the JSON form of a metric value, and reading the rows back.

Rows look like {"step": 120, "time": 1732620000.0, "train/main_loss": 2.1,
"moe/expert_load": [[...], ...], ...}: namespaced keys, arrays as (nested) lists, NaN/inf as
null. onn-train writes them (train.run.metrics_writer); onn-plot, onn-experiment and the tests
read them, so the format lives here, below all of them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from train.common.workdir_check import METRICS_FILE


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
            except (RecursionError, ValueError) as e:  # nested too deeply, an oversized integer
                raise ValueError(f"{path}:{n}: JSON line the reader cannot take: "
                                 f"{'nested too deeply' if isinstance(e, RecursionError) else e}") from None
            rows.append((n, value) if numbered else value)
    return rows


def read_metrics(workdir: str | Path, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """All rows of WORKDIR/metrics.jsonl (empty if the file does not exist); see read_jsonl."""
    return read_jsonl(Path(workdir) / METRICS_FILE, torn_tail_ok)
