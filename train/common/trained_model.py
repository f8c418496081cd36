"""Loading a trained model for inference: the parameters, model config and tokenizer name of a
training workdir's checkpoint (the latest unless a step is given) or of an onn-export folder.

    params, model_cfg, tokenizer, step = load_model(DIR, step=None)

The model config is the one stored in that checkpoint's metadata (config.json only for a
checkpoint without one). onn-generate, onn-eval and onn-export read models here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.common.workdir_check import CHECKPOINT_DIR, CONFIG_FILE


class ModelLoadError(RuntimeError):
    """The workdir or export cannot be loaded; the message names the file."""


def quiet_orbax() -> None:
    """Orbax logs routine notes (e.g. 'directory is read only') as absl warnings; hide them."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl comes with optax/orbax
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


def _config_sections(raw: Any, where: str):
    """(ModelConfig, tokenizer name) from a resolved Config dict."""
    from onn_jax.config import ConfigError, ModelConfig, from_dict
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ModelLoadError(f"{where}: no 'model' section")
    try:
        model_cfg = from_dict(ModelConfig, raw["model"], "model.")
    except ConfigError as e:
        raise ModelLoadError(f"{where}: {e}") from e
    return model_cfg, (raw.get("data") or {}).get("tokenizer", "byte")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_model(workdir: str | Path, step: int | None = None):
    """(params, ModelConfig, tokenizer name, step) of a training workdir or an export; the params
    include the router state the forward reads (stateful-routing models), ready for model.apply."""
    import jax

    from onn_jax import io as ckpt_lib
    from onn_jax.nn.transformer import init_params
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ModelLoadError(f"{workdir}: no such directory")
    try:
        from onn_jax.io import portable
        if portable.is_export(workdir):
            meta = _read_json(workdir / ckpt_lib.EXPORT_META)
            if step is not None and step != meta.get("step"):
                raise ModelLoadError(f"{workdir}: the export holds step {meta.get('step')}, not {step}")
            _config_sections(meta.get("config"), str(workdir / ckpt_lib.EXPORT_META))  # names a bad config
            ex = portable.load_export(workdir, tokenizer="byte")  # the tokenizer is resolved in run()
            return ex.params, ex.model_cfg, portable.folder_tokenizer(str(workdir), meta), ex.step
        if not (workdir / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{workdir}: neither a training workdir (no {CONFIG_FILE}) "
                                f"nor an onn-export directory (no {ckpt_lib.EXPORT_META})")
        ckpt_dir = workdir / CHECKPOINT_DIR
        if not ckpt_dir.is_dir():
            raise ModelLoadError(f"{ckpt_dir}: no checkpoints (train first, or pass an onn-export directory)")
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
        step = ckpt.resolve_step(step)
        model_cfg, tok = checkpoint_config(ckpt, step, workdir)
        params, _ = ckpt.restore_model_params(
            model_cfg, ckpt_lib.abstract_like(init_params, model_cfg, jax.random.key(0)), step)
        return params, model_cfg, tok, step
    except ckpt_lib.CheckpointError as e:
        raise ModelLoadError(str(e)) from e


def checkpoint_config(ckpt, step: int, workdir: Path):
    """(ModelConfig, tokenizer name) the checkpoint of `step` was trained with: the config in
    its own metadata, else (older checkpoints without one) the workdir's config.json, which
    describes the latest run and may differ from an older step's."""
    from onn_jax import io as ckpt_lib
    try:
        raw = ckpt.restore_meta(step).get("config")
    except ckpt_lib.CheckpointError:
        raw = None  # an unreadable meta: the params restore names the damaged step
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        return _config_sections(raw, f"{ckpt.directory}/{step}/{ckpt_lib.META}")
    return _config_sections(_read_json(workdir / CONFIG_FILE), str(workdir / CONFIG_FILE))
