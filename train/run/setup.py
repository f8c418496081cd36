"""A run up to its first step (RunSetup): every check, the workdir and its lock, the step
functions and the initial or restored state.

Everything that can be checked is checked before anything in the workdir is written: config,
data, tokenizer, mesh, memory, the workdir lock, the checkpoint's metadata, tokenizer, data
position and config (a resume whose model/optim settings differ is refused unless
allow_config_change; train.run.compat), and the parameter shapes. train.run.loop.Run goes on
from here.

The start lasts until the first step has run: only then are config.json, metrics.jsonl and tb/
written (open_outputs), so that a step that cannot compile or run (out of device memory)
changes nothing of a resumed run. A start that fails (bad input, a full disk, no memory)
removes what it created (abandon_start): the whole workdir if it made it, else only the entries
it added; nothing that was there before.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jax

from onn_jax import io as ckpt_lib
from onn_jax.config import Config, ConfigError, MeshConfig, to_dict
from onn_jax.data.tokenizer import tokenizer_info
from onn_jax.io.errors import error_cause
from onn_jax.io.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock
from onn_jax.nn.attention import attention_impl
from onn_jax.parallel import mesh as mesh_lib
from onn_jax.parallel.rules import check_batch
from onn_jax.training.guard import make_guarded_step
from onn_jax.training.memory import memory_problem
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.schedules import make_schedule
from onn_jax.training.sharded import abstract_state, sharded_init
from train.common.signals import StopOnSignal
from train.common.workdir_check import CHECKPOINT_DIR, CONFIG_FILE, check_workdir, meta_problem
from train.run.compat import RESUME_FREE_DATA_FIELDS, config_diff, semantic_changes, tokenizer_mismatch
from train.run.data import build_dataset
from train.run.errors import TrainError
from train.run.evaluate import make_eval_step
from train.run.faults import Faults
from train.run.metrics_writer import MetricsWriter, NullWriter
from train.run.output_order import with_output_order


def run_mesh(cfg: MeshConfig):
    """The device mesh; a fully specified shape uses the first data*expert*fsdp devices (one
    process), or must cover every device of a multi-process run (each process feeds its own)."""
    devices = jax.devices()
    sizes = (cfg.data, cfg.expert, cfg.fsdp)
    if -1 not in sizes and jax.process_count() > 1 and math.prod(sizes) != len(devices):
        n, local = jax.process_count(), jax.local_device_count()
        raise TrainError(f"mesh: data*expert*fsdp = {cfg.data}*{cfg.expert}*{cfg.fsdp} = {math.prod(sizes)} "
                         f"devices, but this run of {n} processes has {len(devices)} ({local} per process) and "
                         "the mesh must hold them all (each process feeds the batch rows of its own devices); "
                         "pass --config.mesh.data=-1 (all devices), or sizes whose product is "
                         f"{len(devices)}")
    if -1 not in sizes:
        devices = devices[:math.prod(sizes)]
    try:
        return mesh_lib.make_mesh(cfg, devices)
    except ConfigError as e:
        raise TrainError(str(e)) from e


class RunSetup:
    """A run ready for its first step; train.run.loop.Run adds the steps. Attributes hold what
    the summary reports.

    Everything that can be checked is checked before anything in the workdir is written:
    config, data, tokenizer, mesh, the workdir lock, the checkpoint's tokenizer, shapes and
    data position. Call close() (train() does) to release the workdir lock.
    """

    def __init__(self, cfg: Config, workdir: str | Path, allow_config_change: bool = False):
        self.cfg, self.workdir = cfg, Path(workdir)
        self.allow_config_change = allow_config_change
        self.config_changes: list[dict] = []  # every accepted change of semantics, with its step
        self.pending_change: str | None = None  # recorded in the first metrics row of this run
        self.lock, self.ckpt, self.bar, self.writer = None, None, None, NullWriter()
        self.outputs_open = False  # config.json, metrics.jsonl, tb/ written (after the first step)
        self.stop = StopOnSignal.current() or StopOnSignal()  # no handler installed: never set
        self.abandoned = False  # a save still running in the background was given up
        self.is_chief = jax.process_index() == 0
        try:
            self.faults = Faults()
        except ValueError as e:
            raise TrainError(str(e)) from e
        try:
            attention_impl(cfg.model)  # 'cudnn' on a backend without it
        except ConfigError as e:
            raise TrainError(str(e)) from e
        self.ds = build_dataset(cfg)
        self.cfg = cfg = with_output_order(cfg, self.ds)  # adaptive softmax: ranks from the training split
        self.tok = self.ds.tokenizer
        self.mesh = run_mesh(cfg.mesh)
        too_big = memory_problem(cfg, list(self.mesh.devices.flat))
        if too_big:
            raise TrainError(f"{too_big[0]}: {too_big[1]}")
        try:
            check_batch(cfg.data.batch_size, self.mesh)
        except ConfigError as e:
            raise TrainError(f"data.batch_size: {e.message}") from e
        self._created: Path | None = None  # the first folder this start created (the workdir or above)
        self._before: set[str] | None = None  # the workdir's entries before, if it existed
        try:
            self._open_workdir()
            self.stop.abandon = self.abandon_start  # until the first step's outputs are written
            self._setup()
        except OSError as e:  # a full disk or an I/O error while the run starts
            self.abandon_start()
            raise TrainError(f"--workdir {self.workdir}: cannot write it: {error_cause(e)}; nothing of this "
                             "run was kept. Free space (or fix the disk) and rerun") from None
        except BaseException:
            self.abandon_start()
            raise

    def _open_workdir(self) -> None:
        """Creates the workdir (remembering what it created) and takes its lock (process 0)."""
        w = self.workdir
        if w.is_dir():
            self._before = set(os.listdir(w))
        else:
            top = w.absolute()
            while not top.parent.exists() and top.parent != top:
                top = top.parent
            if not os.path.lexists(top):
                self._created = top
        try:
            w.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            self._created = None
            raise TrainError(f"--workdir {w}: exists and is not a directory") from None
        except OSError as e:
            raise TrainError(f"--workdir {w}: cannot create it ({e.strerror or e})") from None
        if jax.process_index() == 0:
            try:
                self.lock = WorkdirLock(w).acquire()
            except WorkdirBusy as e:  # another trainer works here: touch nothing
                self._created = self._before = None
                raise TrainError(str(e)) from None
            except OSError as e:
                raise TrainError(f"--workdir {w}: not writable ({e.strerror or e})") from None
            self.stop.at_exit.append(self.lock.release)  # a second signal ends the process at once
            problem = None if self._before is None else check_workdir(w, to_dict(self.cfg), self.cfg.checkpoint.enabled)
            if problem:
                self.close()
                raise TrainError(problem)
            if self.lock.stale:
                print(f"onn-train: note: took over the lock of a process that ended without releasing "
                      f"it ({self.lock.stale})", flush=True)

    def abandon_start(self) -> None:
        """Undoes a start that failed before the first step's outputs were written: closes the
        checkpoint manager, removes what this start created while still holding the workdir lock
        (the workdir if it made it, else the entries it added; nothing that was there before),
        then releases the lock. Only process 0 (the lock holder) removes anything."""
        self.stop.abandon = None
        if self.ckpt is not None:
            try:
                self.ckpt.close()
            except Exception:  # noqa: BLE001 - a failed save was reported where it failed
                pass
            self.ckpt = None
        w = self.workdir
        if self.lock is not None and not self.outputs_open:
            if self._created is not None:
                for name in os.listdir(w) if w.is_dir() else []:
                    if name != LOCK_FILE:
                        _remove(w / name)
            elif self._before is not None and w.is_dir():
                for name in set(os.listdir(w)) - self._before - {LOCK_FILE}:
                    _remove(w / name)
        self.close()
        if self._created is not None and not self.outputs_open and jax.process_index() == 0:
            for d in [w.absolute(), *w.absolute().parents]:  # up to the first folder it created
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == self._created:
                    break

    def _setup(self) -> None:
        cfg = self.cfg
        self.lr = make_schedule(cfg.optim, cfg.train.steps)
        self.tx = make_optimizer(cfg.optim, self.lr)
        k = cfg.optim.accum_steps
        try:  # every microbatch must split over the batch mesh axes as the batch does
            check_batch(cfg.data.batch_size // k, self.mesh)
        except ConfigError as e:
            raise TrainError(f"optim.accum_steps: microbatches of {cfg.data.batch_size // k} rows: "
                             f"{e.message}") from e
        self.step_fn = make_guarded_step(cfg.model, self.tx, self.mesh, accum_steps=k)
        self.eval_fn = make_eval_step(cfg.model, len(self.ds.domains), mesh=self.mesh)
        if cfg.checkpoint.enabled:
            try:
                self.ckpt = ckpt_lib.Checkpointer(self.workdir / CHECKPOINT_DIR, save_every=cfg.checkpoint.every,
                                                  keep=cfg.checkpoint.keep)
            except ckpt_lib.CheckpointError as e:
                raise TrainError(str(e)) from e
            for name in self.ckpt.interrupted:
                print(f"onn-train: note: removing {self.workdir / CHECKPOINT_DIR / name}, left by an "
                      "interrupted checkpoint save", flush=True)
        self.skipped_total, self.skipped_in_a_row = 0, 0
        self.state, data_state = self._init_or_restore()
        self.start_step = int(jax.device_get(self.state.step))
        pi, pc = jax.process_index(), jax.process_count()
        if pc > 1:  # the iterator hands process i the i-th equal slice of each global batch
            from onn_jax.parallel.distributed import process_batch_rows
            per = cfg.data.batch_size // pc
            if process_batch_rows(self.mesh, cfg.data.batch_size) != slice(pi * per, (pi + 1) * per):
                raise TrainError("mesh: this process's devices do not hold batch rows "
                                 f"{pi * per}:{(pi + 1) * per}; order the mesh by process")
        try:
            self.data_iter = self.ds.train_iter(cfg.data.batch_size, cfg.data.seed, pi, pc, data_state)
        except ValueError as e:
            raise TrainError(f"data: cannot continue from the data position of checkpoint step "
                             f"{self.start_step} ({e}); did data.source, data.seq_len or data.pack "
                             "change? Use the run's data, or a new --workdir") from e
        self.writer = NullWriter()

    def open_outputs(self) -> None:
        """config.json, metrics.jsonl (rows from the resume step on dropped) and tb/, once the
        first step has run (process 0 only); an OSError here (a full disk) undoes the start."""
        if self.outputs_open:
            return
        if self.is_chief:  # only process 0 writes the workdir's logs, config and plots
            tmp = self.workdir / (CONFIG_FILE + ".tmp")
            try:
                try:
                    self.writer = MetricsWriter(self.workdir,
                                                resume_step=self.start_step + 1 if self.start_step else 0)
                except ValueError as e:
                    raise TrainError(f"cannot append to the run's metrics: {e}") from e
                tmp.write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
                os.replace(tmp, self.workdir / CONFIG_FILE)  # atomic: a kill never leaves half a file
            except OSError as e:
                try:
                    self.writer.close()
                except OSError:
                    pass
                self.writer = NullWriter()
                tmp.unlink(missing_ok=True)
                raise TrainError(f"--workdir {self.workdir}: cannot write it: {error_cause(e)}; nothing of "
                                 "this run was kept. Free space (or fix the disk) and rerun") from None
        self.outputs_open = True
        self.stop.abandon = None

    def close(self) -> None:
        """Closes the checkpoint manager (waiting for its saves, unless one was abandoned) and
        releases the workdir lock (idempotent)."""
        if self.ckpt is not None and not self.abandoned:
            try:
                self.ckpt.close()
            except Exception:  # noqa: BLE001 - a failed save was reported where it failed
                pass
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _init_or_restore(self):
        rng = jax.random.key(self.cfg.train.seed)
        latest = self.ckpt.latest_step() if self.ckpt is not None else None
        if latest is None:
            return sharded_init(self.cfg.model, self.tx, rng, self.mesh), None
        where = f"checkpoint {self.workdir / CHECKPOINT_DIR / str(latest)}"
        try:
            meta = self.ckpt.restore_meta(latest)
        except ckpt_lib.CheckpointError as e:
            raise TrainError(f"cannot resume: {e}") from e
        problem = meta_problem(meta, str(self.workdir / CHECKPOINT_DIR / str(latest)))
        if problem:
            raise TrainError(f"cannot resume: {problem}; the checkpoint's metadata is damaged: move "
                             f"{self.workdir / CHECKPOINT_DIR / str(latest)} away to resume from the previous one")
        mismatch = tokenizer_mismatch(meta.get("tokenizer"), tokenizer_info(self.cfg.data.tokenizer, self.tok), where)
        if mismatch:
            raise TrainError(mismatch)
        saved_data = (meta.get("config") or {}).get("data")
        if saved_data is not None:  # the saved data position only means something in the same stream
            now = {k: v for k, v in to_dict(self.cfg.data).items() if k not in RESUME_FREE_DATA_FIELDS}
            diff = config_diff({k: v for k, v in saved_data.items() if k not in RESUME_FREE_DATA_FIELDS},
                               now, "data")
            if diff:
                raise TrainError(f"{diff[0].split()[0]}: the data settings differ from those of {where} "
                                 f"({'; '.join(diff)}), so the saved data position would not continue the "
                                 "same stream. Resume with the run's data settings, or use a new --workdir")
        self.config_changes = list(meta.get("config_changes") or [])
        changes = semantic_changes(meta.get("config"), self.cfg)
        if changes and not self.allow_config_change:
            fields = ", ".join(c.split()[0] for c in changes)
            raise TrainError(f"{fields}: resuming {where} with a different model/optimizer config "
                             f"({'; '.join(changes)}) would change the run's semantics; resume without "
                             "--config to use the run's saved config, or pass --allow-config-change to "
                             "record the change and go on")
        if changes:
            print(f"onn-train: note: config changed on resume at step {latest} (recorded in "
                  f"metrics.jsonl and the checkpoints): {'; '.join(changes)}", flush=True)
            self.config_changes.append({"step": latest, "changes": changes})
            self.pending_change = "; ".join(changes)
        target = abstract_state(self.cfg.model, self.tx, self.mesh)
        try:
            state, meta = self.ckpt.restore(target, latest)
        except ckpt_lib.CheckpointError as e:
            diff = config_diff((meta.get("config") or {}).get("model"), to_dict(self.cfg.model), "model")
            if diff:
                raise TrainError(f"{diff[0].split()[0]}: the model config differs from the one of {where} "
                                 f"({'; '.join(diff)}), and the parameter shapes do not match: {e}. "
                                 "Resume with the checkpoint's model config, or use a new --workdir") from e
            raise TrainError(f"cannot resume from {self.workdir / CHECKPOINT_DIR}: {e}") from e
        guard = meta.get("guard") or {}
        self.skipped_total = int(guard.get("skipped_steps", 0))
        self.skipped_in_a_row = int(guard.get("skipped_in_a_row", 0))
        return state, (meta or {}).get("data")

    def _meta(self) -> dict:
        tok = tokenizer_info(self.cfg.data.tokenizer, self.tok)
        guard = {"skipped_steps": self.skipped_total, "skipped_in_a_row": self.skipped_in_a_row}
        return ckpt_lib.make_meta(config=to_dict(self.cfg), data_state=self.data_iter.state(),
                                  rng=jax.random.key(self.cfg.train.seed), tokenizer=tok,
                                  domains=list(self.ds.domains), guard=guard,
                                  config_changes=self.config_changes)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass
