"""The params-only orbax export: a training checkpoint's params (no optimizer) for inference.

    OUT/params         orbax PyTree checkpoint of the params
    OUT/export.json    {"step", "config", "tokenizer"} copied from the training meta

`export_params` writes one from a checkpoint directory, `load_params` reads it back
(shape-checked into an abstract target, like a restore), `is_export` tells a complete one:
export.json is written last and atomically, so a folder without it is an interrupted export,
which both refuse. onn_jax.io.portable builds its orbax format on these.
"""
from __future__ import annotations

import json
import os
from typing import Any

from onn_jax.io.checkpointer import TMP_MARK, Checkpointer
from onn_jax.io.errors import CheckpointError
from onn_jax.io.restore_targets import check_shapes, orbax_ckpt, restore_args, tree_from_flat

EXPORT_PARAMS, EXPORT_META = "params", "export.json"


def export_params(ckpt_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> int:
    """Writes the params of checkpoint `step` (default: latest) as an inference export; returns the step."""
    ocp = orbax_ckpt()
    out = os.path.abspath(os.fspath(out))
    _check_export_target(out)
    src = Checkpointer(ckpt_dir, read_only=True)
    step = src.resolve_step(step)
    params, meta = src.restore_params(step=step)
    src.close()
    os.makedirs(out, exist_ok=True)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(os.path.join(out, EXPORT_PARAMS), args=ocp.args.PyTreeSave(params))  # synchronous
    export_meta = {"step": int(step), "config": meta.get("config"), "tokenizer": meta.get("tokenizer")}
    # export.json last and atomically: its presence marks a complete export (see is_export)
    tmp = os.path.join(out, EXPORT_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(export_meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, EXPORT_META))
    return int(step)


def _check_export_target(out: str) -> None:
    """Refuses an `out` that holds a complete export, or the remains of an interrupted one
    (params/ or orbax's temporary params folder without export.json): neither export_params
    nor load_params could use such a folder, and only the user can decide to delete it."""
    if is_export(out):
        raise CheckpointError(f"{out} already holds an export; choose a new directory")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise CheckpointError(f"{out} exists and is not a directory; choose a new directory")
    partial = sorted(n for n in os.listdir(out) if n in (EXPORT_PARAMS, EXPORT_META)
                     or n.startswith(EXPORT_PARAMS + TMP_MARK))
    if partial:
        raise CheckpointError(
            f"{out} holds an incomplete export (found {', '.join(partial)}; a complete one has both "
            f"{EXPORT_PARAMS}/ and {EXPORT_META}: an interrupted onn-export?); delete {out} and export "
            f"again, or choose a new directory")


def is_export(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_META)) and os.path.isdir(os.path.join(path, EXPORT_PARAMS))


def load_params(out: str | os.PathLike, target_params: Any = None) -> tuple[Any, dict]:
    """(params, export meta) of an export written by export_params.

    `target_params`: abstract params (shape-checked, with shardings); None = as saved, on
    the first local device.
    """
    ocp = orbax_ckpt()
    out = os.path.abspath(os.fspath(out))
    if not is_export(out):
        raise CheckpointError(f"{out} is not a params export (expected {EXPORT_PARAMS}/ and {EXPORT_META})")
    with open(os.path.join(out, EXPORT_META)) as f:
        meta = json.load(f)
    path = os.path.join(out, EXPORT_PARAMS)
    ckptr = ocp.PyTreeCheckpointer()
    saved = ocp.tree.to_flat_dict(ckptr.metadata(path).item_metadata.tree, sep="/")
    if target_params is None:
        target_params = tree_from_flat(saved)
    check_shapes(saved, target_params, path)
    return ckptr.restore(path, args=restore_args(target_params)), meta
