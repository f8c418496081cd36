"""Range checks of the flags of onn-generate and onn-export, run before anything is loaded or
written: each returns None, or one line naming the flag (the programs print it and exit 2).

A flag that argparse accepts as an int or float may still be unusable: inf/nan temperatures,
a seed jax cannot hold, a negative step, a prompt that is not text (a lone surrogate from a
badly encoded shell argument). These used to fail late, with a traceback, after the model
was loaded.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

INT32 = 2 ** 31


def _text(value: Any, flag: str) -> str | None:
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{flag}: is not valid text (cannot be encoded as UTF-8 at character {e.start})"
    return None


def _step(step: int | None) -> str | None:
    if step is not None and not 0 <= step < INT32:
        return f"--step {step}: must be in [0, {INT32 - 1}]"
    return None


def generate_args(args) -> str | None:
    """onn-generate: --max-new-tokens, --temperature, --top-p, --seed, --step, --prompt."""
    n = args.max_new_tokens
    if not 1 <= n < INT32:
        return f"--max-new-tokens {n}: max_new_tokens must be in [1, {INT32 - 1}]"
    t = args.temperature
    if not (math.isfinite(t) and t >= 0):
        return f"--temperature {t}: temperature must be a finite number >= 0 (0 = greedy)"
    p = args.top_p
    if not (math.isfinite(p) and 0 < p <= 1):
        return f"--top-p {p}: top_p must be in (0, 1]"
    if not 0 <= args.seed < 2 ** 32:
        return f"--seed {args.seed}: must be in [0, {2 ** 32 - 1}]"
    return _step(args.step) or _text(args.prompt, "--prompt")


def export_args(args) -> str | None:
    """onn-export: --step, and OUT: a new (or empty) directory whose parent is writable."""
    problem = _step(args.step)
    if problem:
        return problem
    out = Path(args.out)
    if os.path.lexists(out) and not out.is_dir():
        return f"{out}: exists and is not a directory; choose a new directory"
    parent = out if out.is_dir() else out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{out}: cannot be created ({parent} is not a directory)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{out}: cannot be written ({parent} is not writable)"
    return None
