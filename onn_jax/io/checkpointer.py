"""Training checkpoints: a thin wrapper over orbax-checkpoint's CheckpointManager.

Layout of a training checkpoint directory (one orbax step folder per saved step):

    DIR/<step>/state   the whole TrainState (step, params, opt_state), orbax PyTree format
    DIR/<step>/meta    JSON: {"config", "data", "rng", "tokenizer", ...} (see checkpoint_meta.make_meta)

The state is saved with orbax's PyTree handler (rather than the Standard one) because it
can restore a *part* of a tree: inference loads `params` alone, without the optimizer.
Restores go into abstract targets, shape-checked first (onn_jax.io.restore_targets).
Saves are asynchronous; a failed one surfaces as a SaveError at the next poll / save /
close, and a save interrupted by a crash leaves a temporary folder (`interrupted_saves`)
that the next writable Checkpointer removes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

from onn_jax.io.errors import CheckpointError, SaveError, error_cause
from onn_jax.io.restore_targets import abstract_like, check_shapes, orbax_ckpt, restore_args, tree_from_flat

STATE, META = "state", "meta"
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's temporary folder names: <step>.orbax-checkpoint-tmp-<n>


def _handlers(ocp) -> dict:
    return {STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


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
        ocp = orbax_ckpt()
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
        ocp = orbax_ckpt()
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
            return orbax_ckpt().tree.to_flat_dict(self._mgr.item_metadata(step)[STATE], sep="/")

    def restore_meta(self, step: int | None = None) -> dict:
        ocp = orbax_ckpt()
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
        ocp = orbax_ckpt()
        step = self.resolve_step(step)
        check_shapes(self.saved_shapes(step), target, f"{self.directory} step {step}")
        with self._reading(step):
            out = self._mgr.restore(step, args=ocp.args.Composite(
                **{STATE: restore_args(target), META: ocp.args.JsonRestore()}))
        return out[STATE], out[META]

    def restore_params(self, target_params: Any = None, step: int | None = None) -> tuple[Any, dict]:
        """(params, meta) alone, without the optimizer state. `target_params`: abstract params
        (shape-checked); None = as saved, on the first local device."""
        step = self.resolve_step(step)
        saved = self.saved_shapes(step)
        where = f"{self.directory} step {step}"
        if target_params is None:
            target_params = tree_from_flat({k[len("params/"):]: v for k, v in saved.items()
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
        ocp = orbax_ckpt()
        step = self.resolve_step(step)
        check_shapes(self.saved_shapes(step), target, f"{self.directory} step {step}", partial=True)
        with self._reading(step):
            out = self._mgr.restore(step, args=ocp.args.Composite(
                **{STATE: restore_args(target, partial=True), META: ocp.args.JsonRestore()}))
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
