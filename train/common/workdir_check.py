"""Checks of an existing onn-train workdir before anything in it is written.

    problem = check_workdir(workdir, config_dict, checkpoint_enabled)   # None, or one line

Two kinds of problem, both found before the run writes anything:

* an entry of the wrong kind or that cannot be replaced (checkpoints/ a file, metrics.jsonl a
  folder, plots/ read-only, ...), which would fail late, after training;
* a previous run that this run would overwrite without resuming from it: metrics.jsonl,
  config.json, plots/ and tb/ are rewritten for the run in progress, so they may only be
  replaced by a run that resumes from the workdir's checkpoints, or that repeats the same
  config from scratch (its files are then recomputed, nothing is lost). A workdir whose
  checkpoints would be ignored (checkpoint.enabled=false) is refused too: a later resume would
  mix two runs.

The workdir's entry names (CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, TB_DIR, PLOTS_DIR) are
defined here once; onn-train writes them and the other programs read them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, TB_DIR, PLOTS_DIR = (
    "config.json", "checkpoints", "metrics.jsonl", "tb", "plots")
FILES = (CONFIG_FILE, METRICS_FILE, CONFIG_FILE + ".tmp", METRICS_FILE + ".tmp")
DIRS = (CHECKPOINT_DIR, TB_DIR, PLOTS_DIR)


def kind_problem(path: Path, want_dir: bool) -> str | None:
    if not os.path.lexists(path):
        return None
    if want_dir and not path.is_dir():
        return f"{path}: exists and is not a directory; move it away (onn-train writes a folder there)"
    if not want_dir and not path.is_file():
        return f"{path}: exists and is not a regular file; move it away (onn-train writes a file there)"
    need = os.W_OK | (os.X_OK if want_dir else 0)
    if not os.access(path, need):
        return f"{path}: not writable; fix its permissions, or use a new --workdir"
    return None


def committed_steps(ckpt_dir: Path) -> list[int]:
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and (ckpt_dir / n).is_dir())


def check_workdir(workdir: str | os.PathLike, config: Mapping[str, Any], checkpoint_enabled: bool) -> str | None:
    """None when the run may write `workdir`, else one line saying what is wrong and what to do."""
    w = Path(workdir)
    for name in FILES:
        problem = kind_problem(w / name, want_dir=False)
        if problem:
            return problem
    for name in DIRS:
        problem = kind_problem(w / name, want_dir=True)
        if problem:
            return problem
    plots = w / PLOTS_DIR
    if plots.is_dir():
        for p in sorted(plots.iterdir()):
            if p.suffix == ".png":
                problem = kind_problem(p, want_dir=False)
                if problem:
                    return problem
    steps = committed_steps(w / CHECKPOINT_DIR)
    if steps and not checkpoint_enabled:
        return (f"checkpoint.enabled: false, but {w / CHECKPOINT_DIR} holds the checkpoints of a previous "
                f"run (steps {steps}), which this run would not resume from while replacing its "
                "metrics.jsonl and plots; use a new --workdir, or enable checkpoints to resume")
    if steps:
        return None  # the run resumes from them
    previous = [n for n in (CONFIG_FILE, METRICS_FILE) if (w / n).is_file()]
    previous += [n + "/" for n in (PLOTS_DIR, TB_DIR) if (w / n).is_dir() and any((w / n).iterdir())]
    if not previous:
        return None
    try:
        same = json.loads((w / CONFIG_FILE).read_text()) == json.loads(json.dumps(dict(config)))
    except (OSError, ValueError):
        same = False
    if same:
        return None  # the same run from scratch (killed before its first checkpoint): recomputed
    return (f"{w}: holds a previous run ({', '.join(previous)}) with "
            + ("another config" if (w / CONFIG_FILE).is_file() else "no config.json")
            + " and no checkpoint to resume from; this run would replace its files. Use a new --workdir, "
            "or move those files away")


def meta_problem(meta: Mapping[str, Any], where: str) -> str | None:
    """None when a checkpoint's metadata has the shape onn-train wrote, else one line naming
    the key (a hand-edited or damaged `meta` would otherwise fail later with a traceback)."""
    for key in ("config", "data", "tokenizer", "guard", "rng"):
        value = meta.get(key)
        if value is not None and not isinstance(value, dict):
            return f"{where}/meta: \"{key}\" must be a JSON object, got {type(value).__name__}"
    for key in ("data", "model"):
        value = (meta.get("config") or {}).get(key)
        if value is not None and not isinstance(value, dict):
            return f"{where}/meta: \"config.{key}\" must be a JSON object, got {type(value).__name__}"
    for key, value in (meta.get("guard") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{where}/meta: \"guard.{key}\" must be an integer >= 0, got {value!r}"
    changes = meta.get("config_changes")
    if changes is not None and not isinstance(changes, list):
        return f"{where}/meta: \"config_changes\" must be a JSON list, got {type(changes).__name__}"
    return None
