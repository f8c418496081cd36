"""Checkpoints: a thin wrapper over orbax-checkpoint's CheckpointManager.

Layout of a training checkpoint directory (one orbax step folder per saved step):

    DIR/<step>/state   the whole TrainState (step, params, opt_state), orbax PyTree format
    DIR/<step>/meta    JSON: {"config", "data", "rng", "tokenizer", ...} (see `make_meta`)

The state is saved with orbax's PyTree handler (rather than the Standard one) because it
can restore a *part* of a tree: inference loads `params` alone, without the optimizer.
Restoring goes into an abstract target (ShapeDtypeStructs, with shardings when given), so
a checkpoint written on one device mesh restores onto another; shapes are checked first,
and a mismatch names the parameter path and both shapes.

An export (`export_params`) is a params-only checkpoint for inference:

    OUT/params         orbax PyTree checkpoint of the params
    OUT/export.json    {"step", "config", "tokenizer"} copied from the training meta

orbax is imported lazily, so the rest of onn_jax works where it is not installed.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

STATE, META = "state", "meta"
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's temporary folder names: <step>.orbax-checkpoint-tmp-<n>
EXPORT_PARAMS, EXPORT_META = "params", "export.json"


class CheckpointError(ValueError):
    """A checkpoint is missing or does not match what the caller expects."""


class SaveError(RuntimeError):
    """A checkpoint save failed (e.g. the disk is full); `step` is the step whose save failed,
    `committed` the steps on disk, `cause` the underlying error in words."""

    def __init__(self, step: int | None, cause: str, committed: list[int]):
        self.step, self.cause, self.committed = step, cause, committed
        what = f"the checkpoint save of step {step}" if step is not None else "a checkpoint save"
        last = f"step {committed[-1]}" if committed else "none"
        super().__init__(f"{what} failed: {cause}; last committed checkpoint: {last}")


def os_error_in(e: BaseException) -> OSError | None:
    """The first OSError with an errno in the chain of `e` (orbax wraps them), else None."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def error_cause(e: BaseException) -> str:
    """The root cause of `e` in words: the first OSError in its chain (e.g. 'No space left on
    device (errno 28): PATH'), else the outermost exception's type and message."""
    cur = os_error_in(e)
    if cur is not None:
        where = f": {cur.filename}" if cur.filename else ""
        return f"{cur.strerror or os.strerror(cur.errno)} (errno {cur.errno}){where}"
    return f"{type(e).__name__}: {str(e)[:300]}"


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onn_jax.io.checkpoint needs orbax-checkpoint "
                          "(pip install orbax-checkpoint==0.12.8)") from e
    return ocp


def _handlers(ocp) -> dict:
    return {STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


# ---------------------------------------------------------------- abstract targets


def with_shardings(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (a matching tree, one Sharding for
    all leaves, or None = the first local device)."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_like(init_fn, *args, shardings: Any = None, **kwargs) -> Any:
    """The restore target for `init_fn(*args, **kwargs)` without computing it (jax.eval_shape)."""
    return with_shardings(jax.eval_shape(lambda: init_fn(*args, **kwargs)), shardings)


def _flat(tree: Any) -> dict[str, Any]:
    ocp = _ocp()
    return ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree), sep="/")


def check_shapes(saved_flat: Mapping[str, Any], target: Any, where: str, partial: bool = False) -> None:
    """Raises CheckpointError naming the first path whose presence or shape differs."""
    want = _flat(target)
    for path, leaf in sorted(want.items(), key=lambda kv: not kv[0].startswith("params/")):
        if path not in saved_flat:
            raise CheckpointError(f"{where}: parameter {path} {tuple(leaf.shape)} is in the model "
                                  "but not in the checkpoint (was it written with another config?)")
        have = tuple(saved_flat[path].shape)
        if have != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {path} has shape {have} in the checkpoint "
                                  f"but {tuple(leaf.shape)} in the model config")
    if not partial:
        extra = sorted(set(saved_flat) - set(want))
        if extra:
            raise CheckpointError(f"{where}: checkpoint holds {extra[0]} (and {len(extra) - 1} more) "
                                  "that the model does not have (was it written with another config?)")


def _restore_args(target: Any, partial: bool = False):
    ocp = _ocp()
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


# ---------------------------------------------------------------- metadata


def rng_to_json(key: jax.Array | None) -> dict | None:
    """A JAX PRNG key (typed or raw uint32) as a JSON-able dict."""
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    impl = str(jax.random.key_impl(key)) if typed else None
    return {"typed": bool(typed), "impl": impl, "data": np.asarray(data).tolist()}


def rng_from_json(obj: dict | None) -> jax.Array | None:
    """Inverse of rng_to_json."""
    if obj is None:
        return None
    data = np.asarray(obj["data"], np.uint32)
    return jax.random.wrap_key_data(data, impl=obj["impl"]) if obj["typed"] else jax.numpy.asarray(data)


def make_meta(config: Any = None, data_state: Mapping | None = None, rng: jax.Array | None = None,
              tokenizer: Mapping | None = None, **extra) -> dict:
    """The JSON metadata stored next to the state.

    config: a dict (e.g. onn_jax.config.to_dict of each section); data_state: the data
    iterator's position (small dict); rng: the training PRNG key; tokenizer: its description.
    """
    meta = {"config": config, "data": dict(data_state) if data_state is not None else None,
            "rng": rng_to_json(rng), "tokenizer": dict(tokenizer) if tokenizer is not None else None}
    meta.update(extra)
    json.dumps(meta)  # fail here, at save time, on anything JSON cannot hold
    return meta


# ---------------------------------------------------------------- the manager


class Checkpointer:
    """Saves every `save_every` steps (and on `force`), keeps the last `keep`; restores exactly.

        ckpt = Checkpointer(workdir / "checkpoints", save_every=100, keep=3)
        start = ckpt.latest_step()
        if start is not None:
            state, meta = ckpt.restore(abstract_like(init_state, cfg, tx, rng, shardings=s))
        ...
        ckpt.save(step, state, make_meta(...))          # async; returns True if it saved
        ckpt.save(step, state, meta, force=True)         # at the end
        ckpt.close()                                     # waits for pending writes
    """

    def __init__(self, directory: str | os.PathLike, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False):
        if not isinstance(save_every, int) or save_every <= 0:
            raise CheckpointError(f"checkpoint save_every must be a positive integer, got {save_every!r}")
        if keep is not None and (not isinstance(keep, int) or keep <= 0):
            raise CheckpointError(f"checkpoint keep must be a positive integer or None, got {keep!r}")
        ocp = _ocp()
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        # Saving cadence is decided in `save` (orbax would also save the first step it sees).
        # A save interrupted by a crash leaves a temporary folder (never a step folder: orbax
        # commits by an atomic rename); a writable manager removes such folders on opening.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1, max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
            cleanup_tmp_directories=not read_only)
        self.save_every = save_every
        self.failed, self._saving, self._closed, self._waiter = False, None, False, None
        self.interrupted = [] if read_only else interrupted_saves(self.directory)
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers(ocp))
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: Mapping | None = None, force: bool = False) -> bool:
        """Saves `state` and `meta` at `step` if due (every save_every steps) or forced.

        Asynchronous: returns once the arrays are copied off the device. Saving a step that
        already exists is a no-op (returns False).
        """
        ocp = _ocp()
        step = int(step)
        if not (force or step % self.save_every == 0) or step in self._mgr.all_steps():
            return False
        self.poll()  # a failed earlier save stops here, not after this one
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state),
                                     META: ocp.args.JsonSave(dict(meta or {}))})
        self._saving = step
        try:
            return self._mgr.save(step, args=args, force=True)
        except Exception as e:  # the synchronous part (tmp folder, array copies) failed
            raise self._failed(step, e) from e

    def _failed(self, step: int | None, e: BaseException) -> SaveError:
        self.failed = True
        return SaveError(step, error_cause(e), self.committed_steps())

    def committed_steps(self) -> list[int]:
        """The steps whose save is committed on disk (step folders; not a save in flight)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def poll(self) -> None:
        """Raises SaveError if an asynchronous save has finished and failed; returns at once
        while one is still running (call it every step: a failure stops the run early)."""
        if self.failed:
            raise SaveError(self._saving, "an earlier save failed", [])
        if self._saving is None or self._mgr.is_saving_in_progress():
            return
        self._join()

    def _join(self) -> None:
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._failed(self._saving, e) from e
        self._saving = None

    def resolve_step(self, step: int | None = None) -> int:
        """`step` if saved (default: the latest), else a CheckpointError listing what exists."""
        self._mgr.reload()
        steps = self._mgr.all_steps()
        if step is None:
            step = self._mgr.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {sorted(steps)}")
        return step

    def saved_shapes(self, step: int | None = None) -> dict[str, Any]:
        """Flat {path: array metadata (shape, dtype)} of the saved state."""
        step = self.resolve_step(step)
        with self._reading(step):
            return _ocp().tree.to_flat_dict(self._mgr.item_metadata(step)[STATE], sep="/")

    def restore_meta(self, step: int | None = None) -> dict:
        ocp = _ocp()
        step = self.resolve_step(step)
        with self._reading(step):
            meta = self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.directory}/{step}/{META}: expected a JSON object")
        return meta

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Turns a failure to read step's files (missing, truncated, garbled) into a
        CheckpointError naming the step folder and what to do."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore raise many kinds for damaged files
            raise CheckpointError(f"cannot read checkpoint {self.directory}/{step} ({type(e).__name__}: "
                                  f"{str(e)[:300]}); it is damaged: move it away to resume from the "
                                  f"previous one ({self.all_steps()})") from e

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest) restored into `target`.

        `target` is an abstract state (see abstract_like) whose shardings decide where each
        array lands; shapes must match the checkpoint exactly.
        """
        ocp = _ocp()
        step = self.resolve_step(step)
        check_shapes(self.saved_shapes(step), target, f"{self.directory} step {step}")
        with self._reading(step):
            out = self._mgr.restore(step, args=ocp.args.Composite(
                **{STATE: _restore_args(target), META: ocp.args.JsonRestore()}))
        return out[STATE], out[META]

    def restore_params(self, target_params: Any = None, step: int | None = None) -> tuple[Any, dict]:
        """(params, meta) alone, without the optimizer state. `target_params`: abstract params
        (shape-checked); None = as saved, on the first local device."""
        step = self.resolve_step(step)
        saved = self.saved_shapes(step)
        where = f"{self.directory} step {step}"
        if target_params is None:
            target_params = _tree_from_flat({k[len("params/"):]: v for k, v in saved.items()
                                              if k.startswith("params/")})
            if not target_params:
                raise CheckpointError(f"{where}: the checkpoint holds no params")
        state, meta = self.restore_partial({"params": target_params}, step)
        return state["params"], meta

    def restore_model_params(self, model_cfg, target_params: Any = None,
                             step: int | None = None) -> tuple[Any, dict]:
        """(the params the forward applies, meta), without the optimizer state: the params and,
        for a stateful-routing model (model.moe.aux_free_rate > 0, adaptive_experts), the router
        state the forward reads (its bias / live mask, onn_jax.training.options.router_state.forward_params).
        Generation, evaluation and exports use this, so they route as the training run did."""
        from onn_jax.training.options.router_state import forward_params, init_router_state
        params, meta = self.restore_params(target_params, step)
        rs_target = abstract_like(init_router_state, model_cfg)
        if not rs_target:
            return params, meta
        state, _ = self.restore_partial({"router_state": rs_target}, step)
        return forward_params(params, state["router_state"]), meta

    def restore_partial(self, target: dict, step: int | None = None) -> tuple[dict, dict]:
        """(the state's items named in `target`, e.g. {"params": ..., "router_state": ...}, meta);
        `target`'s leaves are abstract arrays (shape-checked), the other items are not read."""
        ocp = _ocp()
        step = self.resolve_step(step)
        check_shapes(self.saved_shapes(step), target, f"{self.directory} step {step}", partial=True)
        with self._reading(step):
            out = self._mgr.restore(step, args=ocp.args.Composite(
                **{STATE: _restore_args(target, partial=True), META: ocp.args.JsonRestore()}))
        return out[STATE], out[META]

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until pending asynchronous saves are on disk (SaveError if one failed).
        With `timeout` (seconds), gives up after it and returns False (the save is still
        running: the caller abandons it; its temporary folder is removed at the next start)."""
        if timeout is None:
            self._join()
            return True
        if self._saving is None:
            return True
        import threading
        if self._waiter is None:  # one waiting thread per save, shared by repeated calls
            outcome: list[BaseException | None] = []

            def join():
                try:
                    self._join()
                    outcome.append(None)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    outcome.append(e)

            self._waiter = (threading.Thread(target=join, name="onn-checkpoint-wait", daemon=True), outcome)
            self._waiter[0].start()
        thread, outcome = self._waiter
        thread.join(timeout)
        if not outcome:
            return False
        self._waiter = None
        if outcome[0] is not None:
            raise outcome[0]
        return True

    def saving(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return self._saving is not None and self._mgr.is_saving_in_progress()

    def close(self) -> None:
        """Waits for pending saves and closes the manager (SaveError if a save failed); a
        manager whose save failed is left as it is (orbax would raise the same error again)."""
        if self.failed or self._closed:
            return
        self._join()
        self._mgr.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def interrupted_saves(directory: str | os.PathLike) -> list[str]:
    """Names of the temporary folders that interrupted saves left in `directory`."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if TMP_MARK in n and os.path.isdir(os.path.join(directory, n)))


def _tree_from_flat(flat: Mapping[str, Any]) -> dict:
    """Nested dict of single-device ShapeDtypeStructs from flat {a/b/c: metadata}."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree: dict = {}
    for path, meta in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)
    return tree


# ---------------------------------------------------------------- params-only export


def export_params(ckpt_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> int:
    """Writes the params of checkpoint `step` (default: latest) as an inference export; returns the step."""
    ocp = _ocp()
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
    ocp = _ocp()
    out = os.path.abspath(os.fspath(out))
    if not is_export(out):
        raise CheckpointError(f"{out} is not a params export (expected {EXPORT_PARAMS}/ and {EXPORT_META})")
    with open(os.path.join(out, EXPORT_META)) as f:
        meta = json.load(f)
    path = os.path.join(out, EXPORT_PARAMS)
    ckptr = ocp.PyTreeCheckpointer()
    saved = ocp.tree.to_flat_dict(ckptr.metadata(path).item_metadata.tree, sep="/")
    if target_params is None:
        target_params = _tree_from_flat(saved)
    check_shapes(saved, target_params, path)
    return ckptr.restore(path, args=_restore_args(target_params)), meta
