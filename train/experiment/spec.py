"""Experiment files and the Config of one grid cell (label, seed).

An experiment file defines `get_experiment()` returning a dict:
  name       the experiment's name (default output dir runs/experiments/<name>)
  base       a training config file (path relative to the experiment file or the cwd)
  overrides  {dotted config key: value} for every run, e.g. {"train.steps": 300}
  runs       {label: {dotted key: value}}: the grid's rows (router kinds, surprise variants...)
  seeds      [int]: each run is repeated with train.seed = seed (same data, new init)
  vary_data  (default False) True: each seed also sets data.seed = seed, so the seeds vary the
             data order, the builtin corpus sample and its held-out split, not only the init
  baselines  (routing, optional) [labels]: results.md adds a table of each row's held-out loss
             difference to these rows, paired by seed (mean ± standard error)
  kind       "routing" (default) or "forgetting"
  phases     (forgetting) {"first": [domains], "second": [domains], "first_steps": int,
             "second_steps": int}: train on the first domains, then continue (parameters and
             optimizer state) on the second; the rise of the first domains' loss is forgetting.

Errors are ExperimentError naming the file and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from train.common.config_loader import (
    ConfigLoadError,
    apply_overrides,
    build_config,
    exec_python_file,
    load_config_file,
    with_defaults,
)

KINDS = ("routing", "forgetting")


class ExperimentError(ValueError):
    """A bad experiment file; the message names the file and the key."""


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Runs get_experiment() of `path` and validates it (errors name the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: experiment file not found")
    try:
        exp = dict(exec_python_file(path, f"_onn_experiment_{path.stem}").get_experiment())
    except Exception as e:
        raise ExperimentError(f"{path}: cannot load get_experiment(): {type(e).__name__}: {e}") from e
    exp.setdefault("name", path.stem)
    exp.setdefault("kind", "routing")
    exp.setdefault("overrides", {})
    exp.setdefault("seeds", [0])
    where = lambda key: f"{path}: {key}"
    exp.setdefault("vary_data", False)
    exp.setdefault("baselines", [])
    unknown = set(exp) - {"name", "base", "overrides", "runs", "seeds", "kind", "phases", "vary_data", "baselines"}
    if unknown:
        raise ExperimentError(where(f"unknown keys {sorted(unknown)}"))
    if not isinstance(exp["baselines"], list) or not set(exp["baselines"]) <= set(exp.get("runs") or {}):
        raise ExperimentError(where(f"baselines must be a list of run labels, got {exp['baselines']!r}"))
    if not isinstance(exp["vary_data"], bool):
        raise ExperimentError(where(f"vary_data must be a bool, got {exp['vary_data']!r}"))
    if exp["kind"] not in KINDS:
        raise ExperimentError(where(f"kind must be one of {list(KINDS)}, got {exp['kind']!r}"))
    if not isinstance(exp.get("runs"), dict) or not exp["runs"]:
        raise ExperimentError(where("runs must be a non-empty {label: {dotted key: value}} dict"))
    if not exp["seeds"] or not all(isinstance(s, int) for s in exp["seeds"]):
        raise ExperimentError(where(f"seeds must be a non-empty list of ints, got {exp['seeds']!r}"))
    base = Path(exp.get("base", ""))
    candidates = [path.parent / base, base]
    found = [c for c in candidates if str(base) and c.is_file()]
    if not found:
        raise ExperimentError(where(f"base config {str(base)!r} not found (relative to {path.parent} or the cwd)"))
    exp["base"] = str(found[0])
    if exp["kind"] == "forgetting":
        ph = exp.get("phases")
        need = {"first", "second", "first_steps", "second_steps"}
        if not isinstance(ph, dict) or set(ph) != need:
            raise ExperimentError(where(f"phases must have exactly the keys {sorted(need)}"))
    exp["path"] = str(path)
    return exp


def set_dotted(cfg: dict, key: str, value: Any, source: str) -> None:
    """cfg[a][b][c] = value for key 'a.b.c'; the key must exist (typos are errors)."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ExperimentError(f"{source}: unknown config key {key!r} (at {'.'.join(parts[:i + 1])!r})")
        if i < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = value


def run_config(exp: dict, label: str, seed: int, extra: dict | None = None):
    """The validated Config of one grid cell: base <- overrides <- runs[label] <- extra, seed."""
    raw = with_defaults(load_config_file(exp["base"]))
    src = exp["path"]
    for k, v in {**exp["overrides"], **exp["runs"][label], **(extra or {})}.items():
        set_dotted(raw, k, v, f"{src}: runs[{label!r}]" if k in exp["runs"][label] else src)
    set_dotted(raw, "train.seed", seed, src)
    if exp.get("vary_data"):
        set_dotted(raw, "data.seed", seed, src)
    try:
        raw = apply_overrides(raw, exp.get("cli_overrides", ()), exp["base"])  # --config.* flags: last word
        return build_config(raw, src)
    except ConfigLoadError as e:
        raise ExperimentError(f"runs[{label!r}]: {e}") from e
