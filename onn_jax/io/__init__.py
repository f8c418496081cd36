"""Checkpoints, exports and run folders.

The package's namespace is the checkpoint API, gathered from its modules so that a program
reads it as one (`from onn_jax import io as ckpt_lib`; `ckpt_lib.Checkpointer`, `ckpt_lib.make_meta`):

    errors.py           CheckpointError, SaveError, ExportWriteError; the OS error behind an orbax,
                        tensorstore or safetensors failure
    restore_targets.py  abstract targets, shape checks, restore arguments (the lazy orbax import)
    checkpoint_meta.py  the JSON meta saved with each step (config, data position, PRNG key)
    checkpointer.py     Checkpointer: orbax CheckpointManager; async saves, restores, interrupted saves
    params_export.py    export_params / load_params: the params-only orbax export

portable.py (safetensors / npz / orbax exports with tokenizer and model card) and workdir.py
(run folders) are imported by module.
"""
from onn_jax.io.checkpoint_meta import make_meta, rng_from_json, rng_to_json
from onn_jax.io.checkpointer import META, STATE, TMP_MARK, Checkpointer, interrupted_saves
from onn_jax.io.errors import CheckpointError, ExportWriteError, SaveError, error_cause, os_error_in
from onn_jax.io.params_export import EXPORT_META, EXPORT_PARAMS, export_params, is_export, load_params
from onn_jax.io.restore_targets import abstract_like, check_shapes, with_shardings

__all__ = ["EXPORT_META", "EXPORT_PARAMS", "META", "STATE", "TMP_MARK", "CheckpointError", "Checkpointer",
           "ExportWriteError", "SaveError", "abstract_like", "check_shapes", "error_cause", "export_params",
           "interrupted_saves", "is_export", "load_params", "make_meta", "os_error_in", "rng_from_json",
           "rng_to_json", "with_shardings"]
