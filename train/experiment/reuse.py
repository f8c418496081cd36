"""When a results.jsonl row of onn-experiment may stand for a cell that is asked for again.

A row is reused when its config hash equals the cell's. Otherwise it is still reused when the
configs it was made with (stored in the row, or, for rows written before they were stored, the
config.json files of its run directories) differ from the cell's only by fields that did not
exist then and that the cell leaves at their defaults: by the project's rule, a new option's
default is the behaviour from before the option existed. So adding an option to the code does
not throw away a grid's results, while any change of a field both sides have (a changed default
included) still re-runs the cell.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence


def _field_default(obj: Any, name: str) -> Any:
    """The dataclass default of obj's field `name`, as a JSON-shaped value."""
    from onn_jax.config import to_dict
    field = next((f for f in dataclasses.fields(obj) if f.name == name), None)
    if field is None:
        return dataclasses.MISSING
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    return to_dict(value) if dataclasses.is_dataclass(value) else json.loads(json.dumps(value))


def added_fields(old: dict, new: dict, obj: Any, prefix: str = "") -> list[str] | None:
    """The dotted fields of `new` (the to_dict of config object `obj`) that `old` lacks, all at
    their defaults; None when old and new differ otherwise (a shared field differs, old has a
    field new lacks, or an added field is not at its default)."""
    if set(old) - set(new):
        return None
    added: list[str] = []
    for key, value in new.items():
        child = getattr(obj, key, None) if dataclasses.is_dataclass(obj) else None
        if key not in old:
            if not dataclasses.is_dataclass(obj) or value != _field_default(obj, key):
                return None
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(old[key], dict) and dataclasses.is_dataclass(child):
            sub = added_fields(old[key], value, child, f"{prefix}{key}.")
            if sub is None:
                return None
            added += sub
        elif old[key] != value:
            return None
    return added


def stored_configs(row: dict, out: Path, kind: str) -> list[dict] | None:
    """The config dicts a row was made with: its `configs`, else (routing rows written before
    rows stored them) its run directory's config.json; None when neither exists. A forgetting
    run's config.json names its phase file, not the phase's domains, so only `configs` counts."""
    if isinstance(row.get("configs"), list):
        return row["configs"]
    if kind != "routing":
        return None
    try:
        config = json.loads((out / "runs" / str(row.get("label")) / f"seed_{row.get('seed')}"
                             / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return [config] if isinstance(config, dict) else None


def reusable(old_dicts: list[dict] | None, new_dicts: list[dict], configs: Sequence) -> list[str] | None:
    """The fields added since the row was made (all at their defaults) when the row may stand for
    the cell whose resolved configs are `configs` (dicts `new_dicts`); None when it may not."""
    if old_dicts is None or len(old_dicts) != len(new_dicts):
        return None
    added: list[str] = []
    for old, new, cfg in zip(old_dicts, new_dicts, configs):
        fields = added_fields(old, new, cfg)
        if fields is None:
            return None
        added += [f for f in fields if f not in added]
    return added


def set_aside_stale_run(workdir: Path, configs: Sequence, tag: str) -> Path | None:
    """Moves a cell's run directory to `<name>.replaced-<tag>[-n]` when it holds a run of other
    settings (a replaced row's, or a run cut before its row was written): the new run starts in
    a clean directory and nothing is deleted. A directory whose config.json files equal the
    cell's configs stays (onn-train resumes it from its checkpoint, if any). Returns the new path."""
    from onn_jax.config import to_dict
    if not workdir.exists():
        return None
    files = ([workdir / "config.json"] if len(configs) == 1
             else [workdir / p / "config.json" for p in ("first", "second")])
    try:
        if all(json.loads(f.read_text()) == to_dict(c) for f, c in zip(files, configs)):
            return None
    except (OSError, ValueError):
        pass
    dest, n = workdir.with_name(f"{workdir.name}.replaced-{tag}"), 1
    while dest.exists():
        dest, n = workdir.with_name(f"{workdir.name}.replaced-{tag}-{n}"), n + 1
    workdir.rename(dest)
    return dest
