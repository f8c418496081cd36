"""results.jsonl, one row per finished cell: read back (a torn last line, from a write cut by a
kill, is dropped) and rewritten atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from train.common.metrics_file import read_jsonl
from train.experiment.spec import ExperimentError


def read_results(path: Path) -> list[dict]:
    """The rows of results.jsonl; a torn last line (a write cut by a kill) is dropped."""
    try:
        numbered = read_jsonl(path, torn_tail_ok=True, numbered=True)  # a half-written cell runs again
    except ValueError as e:
        raise ExperimentError(f"{e}; fix or delete the line") from None
    for n, row in numbered:
        if not isinstance(row, dict) or "label" not in row or "seed" not in row:
            raise ExperimentError(f"{path}:{n}: not a result row (no label/seed); fix or delete the line")
    return [row for _, row in numbered]


def write_results(path: Path, rows: Sequence[dict]) -> None:
    """Rewrites results.jsonl atomically (a kill never leaves it half written)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
