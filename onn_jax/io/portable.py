"""Self-contained exports: parameters (orbax, safetensors or npz), tokenizer, config, model card.

    write_export(checkpoints_dir, out, fmt="safetensors")      # onn-export
    ex = load_export(out)                                     # anywhere, nothing else needed
    logits = Transformer(ex.model_cfg).apply({"params": ex.params}, tokens)

An export folder (the usual model-folder layout):

    config.json             model_type, format, step, the model config, vocab size, param count
    model.safetensors | params.npz | params/ (orbax)   the parameters, keys `block_0.moe.thresholds`
    tokenizer.json          the HF tokenizer file copied in (absent for the byte tokenizer)
    tokenizer_config.json   kind, vocab size, special ids, role markers, chat and text templates
    README.md               the model card: config, step, parameter count, what each parameter means
    export.json             {step, config, tokenizer, format}, written last: marks a complete export

The folder is written beside OUT (a hidden `.OUT.onn-export-*` folder in the same parent) and
renamed to OUT when complete: a failure (a full disk) removes it and raises ExportWriteError,
so OUT is never half written and nothing else in its parent is touched.

The safetensors and npz keys are the parameter paths joined by "."; the arrays are float32
as trained. onn_jax is only needed to run the model, not to read the files (README).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple

import numpy as np

from onn_jax.io.checkpointer import Checkpointer
from onn_jax.io.errors import CheckpointError, ExportWriteError
from onn_jax.io.params_export import EXPORT_META, EXPORT_PARAMS, load_params
from onn_jax.io.restore_targets import abstract_like

FORMATS = ("orbax", "safetensors", "npz")
PARAM_FILES = {"orbax": EXPORT_PARAMS, "safetensors": "model.safetensors", "npz": "params.npz"}
CONFIG, TOKENIZER, TOKENIZER_CONFIG, CARD = "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"
MODEL_TYPE = "onn-jax-moe"

# What a raw parameter means, by its leaf name (the model card lists every path).
MEANINGS = {
    "embedding": "token embedding [vocab, hidden]",
    "kernel": "a dense projection's weight (attention: [hidden, heads, head_dim] or back; lm_head: "
              "[hidden, vocab])",
    "scale": "a norm's learned scale", "bias": "a norm's learned bias",
    "prototypes": "expert prototypes P [hidden, experts]; gate logits are cosine(x, P_e)",
    "thresholds": "theta [experts], BEFORE the sigmoid: expert e is active for a token when "
                  "cosine(x, P_e) - sigmoid(theta_e) > 0",
    "router": "the top-k baseline router's weight [hidden, experts]",
    "w1": "expert FFN input weight [experts, hidden, intermediate]",
    "w2": "expert FFN output weight [experts, intermediate, hidden]",
    "w3": "expert FFN gate weight (SwiGLU) [experts, hidden, intermediate]",
    "ffn_w1": "dense FFN input weight", "ffn_w2": "dense FFN output weight", "ffn_w3": "dense FFN gate weight",
    "head": "adaptive softmax head [hidden, cutoffs[0] + tail clusters] (model.output; ids by config order)",
    "proj": "adaptive softmax tail projection [hidden, d_i]", "out": "adaptive softmax tail output [d_i, cluster ids]",
}


class Export(NamedTuple):
    params: Any
    model_cfg: Any  # onn_jax.config.ModelConfig
    tokenizer: Any  # onn_jax.data.tokenizer.Tokenizer
    step: int
    meta: dict


# ---------------------------------------------------------------- flat <-> nested


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{"block_0.moe.thresholds": array} of a nested dict of arrays."""
    out = {}
    for k, v in tree.items():
        if "." in str(k):
            raise ValueError(f"parameter name {k!r} contains '.', which the flat keys use as separator")
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = np.asarray(v)
    return out


def unflatten(flat: dict[str, Any], target: Any, where: str) -> Any:
    """Nested params shaped like `target` (abstract), from flat arrays; names and shapes checked."""
    want = flatten_abstract(target)
    for key, leaf in want.items():
        if key not in flat:
            raise CheckpointError(f"{where}: parameter {key} {tuple(leaf.shape)} is missing")
        if tuple(flat[key].shape) != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {key} has shape {tuple(flat[key].shape)} "
                                  f"but {tuple(leaf.shape)} in config.json's model")
    extra = sorted(set(flat) - set(want))
    if extra:
        raise CheckpointError(f"{where}: holds {extra[0]} that config.json's model does not have")

    def build(node, prefix):
        return {k: build(v, f"{prefix}{k}.") if hasattr(v, "items") else
                np.asarray(flat[f"{prefix}{k}"], dtype=v.dtype) for k, v in node.items()}
    return build(target, "")


def flatten_abstract(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(flatten_abstract(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out


# ---------------------------------------------------------------- tokenizer description


def tokenizer_description(tok, kind: str) -> dict:
    """tokenizer_config.json: what generation needs to encode prompts as training did."""
    from onn_jax.data.tokenizer import ROLES, ByteTokenizer
    desc = {"kind": kind, "vocab_size": int(tok.vocab_size), "pad_id": int(tok.pad_id),
            "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id),
            "role_ids": {r: [int(i) for i in tok.role_ids(r)] for r in ROLES},
            "chat_template": "BOS, then per message: role_ids[role] + encode(content) + EOS; a reply "
                             "is sampled after BOS ... + role_ids['assistant']; loss on assistant "
                             "content and its EOS only",
            "text_template": "plain-text records: BOS + encode(text) + EOS, loss on all but BOS "
                             "(generate with --raw: BOS + prompt)"}
    if kind == "byte":
        desc["vocab"] = "ids 0..255 are the UTF-8 bytes; then the special ids below"
        desc["special_tokens"] = {name: i for i, name in ByteTokenizer.SPECIAL_NAMES.items()}
    else:
        desc["file"] = TOKENIZER
    return desc


def _resolve_tokenizer(info: dict, override: str | None):
    """(name, tokenizer, info for the export) of the checkpoint's tokenizer, checked to be the
    one it was trained with; writes nothing."""
    from onn_jax.data.tokenizer import load_tokenizer, tokenizer_info
    name = override or (info or {}).get("name") or "byte"
    try:
        tok = load_tokenizer(name)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"tokenizer {name!r} of the checkpoint cannot be loaded ({e}); "
                              "pass --tokenizer PATH to its tokenizer.json") from e
    now = tokenizer_info(name, tok)
    if info and (info.get("vocab_size"), info.get("fingerprint")) != (now["vocab_size"], now["fingerprint"]):
        raise CheckpointError(f"tokenizer {name!r} (vocab {now['vocab_size']}) is not the one the "
                              f"checkpoint was trained with ({info.get('name')!r}, vocab "
                              f"{info.get('vocab_size')})")
    return name, tok, dict(now, name="byte" if name == "byte" else TOKENIZER)


# ---------------------------------------------------------------- writing


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically (a temporary file, synced, renamed
    over it): a kill never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_export(path: str | os.PathLike) -> bool:
    """A complete export of any format (export.json and its parameter file)."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, EXPORT_META)) as f:
            fmt = json.load(f).get("format", "orbax")
    except (OSError, ValueError, AttributeError):
        return False
    return os.path.exists(os.path.join(path, PARAM_FILES.get(fmt, EXPORT_PARAMS)))


def model_card(model: dict, step: int, flat: dict, tok_desc: dict, fmt: str) -> str:
    n = sum(int(np.prod(a.shape)) for a in flat.values())
    lines = [f"# onn-jax model (step {step})", "",
             "A surprise-gated sparse Mixture-of-Experts language model trained with onn-jax "
             "(the algorithm: docs/ALGORITHM.md of the onn-jax repository).", "",
             f"- parameters: {n:,} ({fmt}: {PARAM_FILES[fmt]})", f"- training step: {step}",
             f"- tokenizer: {tok_desc['kind']}, vocab {tok_desc['vocab_size']}, special ids pad "
             f"{tok_desc['pad_id']} bos {tok_desc['bos_id']} eos {tok_desc['eos_id']} (tokenizer_config.json)",
             "", "## Config (model)", "", "```json", json.dumps(model, indent=2), "```", "",
             "## Parameters", "", "| path | shape | meaning |", "| --- | --- | --- |"]
    for key, a in flat.items():
        lines.append(f"| `{key}` | {list(a.shape)} | {MEANINGS.get(key.rsplit('.', 1)[-1], '')} |")
    lines += ["", "## Use", "", "```", "onn-generate --workdir THIS_FOLDER --prompt 'Hello'        # chat turn",
              "onn-generate --workdir THIS_FOLDER --raw --prompt 'Once'    # continue plain text", "```", ""]
    return "\n".join(lines)


LAYOUTS = ("as_trained", "per_layer", "stacked")


def _model_config(model: dict, where: str):
    """The ModelConfig of a saved `model` section (CheckpointError naming `where` if invalid)."""
    from onn_jax.config import ConfigError, ModelConfig, from_dict
    try:
        return from_dict(ModelConfig, model, "model.")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def write_export(ckpt_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                 fmt: str = "orbax", tokenizer: str | None = None, layout: str = "as_trained") -> int:
    """Exports checkpoint `step` (default: latest) of `ckpt_dir` to the new folder `out`; returns the step.

    tokenizer: the tokenizer.json to copy in (default: the one the checkpoint records).
    layout: the blocks' parameter layout in the export (onn_jax.nn.layer_stack): `as_trained`,
    `per_layer` (block_i/..., model.scan_layers = false) or `stacked` (blocks/... [L, ...],
    model.scan_layers = true); the exported config's model.scan_layers says which."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    out = os.path.abspath(os.fspath(out))
    if is_export(out):
        raise CheckpointError(f"{out} already holds an export; choose a new directory")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} exists and is not an empty directory; choose a new one")
    from onn_jax.training.options.router_state import init_router_state
    src = Checkpointer(ckpt_dir, read_only=True)
    try:
        step = src.resolve_step(step)
        config = src.restore_meta(step).get("config") or {}
        if not isinstance(config.get("model"), dict):
            raise CheckpointError(f"{ckpt_dir}/{step}: the checkpoint records no model config")
        model_cfg = _model_config(config["model"], f"{ckpt_dir}/{step}")
        stateful = bool(init_router_state(model_cfg))
        if stateful and layout == "stacked":
            raise CheckpointError(
                "--layout stacked: this model routes with router state (model.moe.aux_free_rate / "
                "adaptive_experts), which model.scan_layers does not support; export it per_layer")
        # The router state the forward reads (a bias, a live mask) travels inside the params.
        params, meta = src.restore_model_params(model_cfg, step=step)
    finally:
        src.close()
    if layout != "as_trained":
        from onn_jax.nn.layer_stack import to_layout
        params = to_layout(params, layout == "stacked")
        config = {**config, "model": {**config["model"], "scan_layers": layout == "stacked"}}
    flat = flatten(params)
    tok_name, tok, tok_info = _resolve_tokenizer(meta.get("tokenizer"), tokenizer)
    desc = tokenizer_description(tok, "byte" if tok_name == "byte" else "hf")
    n_params = sum(int(np.prod(a.shape)) for a in flat.values())
    files = {CONFIG: {"model_type": MODEL_TYPE, "format": fmt, "params_file": PARAM_FILES[fmt], "step": int(step),
                      "vocab_size": config["model"].get("vocab_size"), "num_parameters": n_params,
                      "model": config["model"], "tokenizer": tok_info["name"]},
             EXPORT_META: {"step": int(step), "config": config, "tokenizer": tok_info, "format": fmt}}
    with _beside(out) as tmp:  # all checks done: from here on only writing, into a folder beside OUT
        if tok_name != "byte":
            shutil.copyfile(tok_name, os.path.join(tmp, TOKENIZER))
        write_json(os.path.join(tmp, TOKENIZER_CONFIG), desc)
        write_json(os.path.join(tmp, CONFIG), files[CONFIG])
        with open(os.path.join(tmp, CARD), "w") as f:
            f.write(model_card(config["model"], int(step), flat, desc, fmt))
        _write_params(os.path.join(tmp, PARAM_FILES[fmt]), fmt, params, flat, step)
        write_json(os.path.join(tmp, EXPORT_META), files[EXPORT_META])
    return int(step)


def _write_params(path: str, fmt: str, params: Any, flat: dict, step: int) -> None:
    if fmt == "orbax":
        import orbax.checkpoint as ocp
        ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(params))
    elif fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file(flat, path, metadata={"format": "np", "step": str(step)})
    else:
        with open(path, "wb") as f:
            np.savez(f, **flat)
            f.flush()
            os.fsync(f.fileno())


class _beside:
    """A temporary folder beside `out` (same parent, so the final rename is atomic) that becomes
    `out` when the block ends without an error. On any error (a full disk: orbax, safetensors
    and numpy each report it their own way) the folder and any parent folders it created are
    removed and ExportWriteError names the cause: OUT is never half written, and nothing else
    beside it (earlier exports) is touched. A kill -9 leaves a hidden `.OUT.onn-export-*`
    folder, never OUT."""

    def __init__(self, out: str):
        self.out, self.tmp, self.made = out, None, None

    def __enter__(self) -> str:
        import tempfile
        parent = os.path.dirname(self.out)
        top = parent
        while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
            top = os.path.dirname(top)
        try:
            if not os.path.isdir(parent):
                self.made = top
                os.makedirs(parent)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.onn-export-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # as a plain mkdir would (mkdtemp: 0700)
        except OSError as e:
            self._clean()
            raise ExportWriteError(self.out, e) from None
        return self.tmp

    def __exit__(self, kind, e, tb) -> bool:
        if kind is None:
            try:
                os.rename(self.tmp, self.out)  # replaces an empty OUT; fails on a non-empty one
                return False
            except OSError as err:
                e = err
        if isinstance(e, Exception):
            self._clean()
            raise ExportWriteError(self.out, e) from None
        self._clean()
        return False

    def _clean(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.made is not None:
            d = os.path.dirname(self.out)
            while True:  # the parent folders this export created, innermost first
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == self.made:
                    break
                d = os.path.dirname(d)


# ---------------------------------------------------------------- reading


def load_export(path: str | os.PathLike, tokenizer: str | None = None) -> Export:
    """The model of an export folder (any format; also a bare safetensors model folder with
    config.json), its tokenizer (`tokenizer` overrides the folder's) and its step."""
    import jax

    from onn_jax.data.tokenizer import load_tokenizer
    from onn_jax.nn.transformer import init_params
    from onn_jax.training.options.router_state import forward_params, init_router_state
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, EXPORT_META)
    cfg_path = meta_path if os.path.isfile(meta_path) else os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an export (no {EXPORT_META} or {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    model = (meta.get("config") or {}).get("model") if cfg_path == meta_path else meta.get("model")
    fmt = meta.get("format", "orbax")
    if not isinstance(model, dict) or fmt not in FORMATS:
        raise CheckpointError(f"{cfg_path}: no model config or unknown format {fmt!r}")
    model_cfg = _model_config(model, cfg_path)
    target = abstract_like(  # with the router state a stateful-routing model applies
        lambda: forward_params(init_params(model_cfg, jax.random.key(0)), init_router_state(model_cfg)))
    file = os.path.join(path, PARAM_FILES[fmt])
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: missing (the export is incomplete)")
    if fmt == "orbax":
        params, _ = load_params(path, target)
    elif fmt == "safetensors":
        from safetensors.numpy import load_file
        params = unflatten(load_file(file), target, file)
    else:
        with np.load(file) as z:
            params = unflatten({k: z[k] for k in z.files}, target, file)
    tok_name = tokenizer or folder_tokenizer(path, meta)
    try:
        tok = load_tokenizer(tok_name)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"tokenizer {tok_name!r}: {e} (pass --tokenizer PATH)") from e
    return Export(params, model_cfg, tok, int(meta.get("step") or 0), meta)


def folder_tokenizer(path: str, meta: dict) -> str:
    """The export's own tokenizer: its tokenizer.json, else byte if described so, else (older
    exports) the name the training run used."""
    if os.path.isfile(os.path.join(path, TOKENIZER)):
        return os.path.join(path, TOKENIZER)
    if os.path.isfile(os.path.join(path, TOKENIZER_CONFIG)):
        return "byte"
    info = meta.get("tokenizer")
    name = info.get("name") if isinstance(info, dict) else info
    return name or ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or "byte"
