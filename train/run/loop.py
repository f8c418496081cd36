"""The training loop behind `onn-train`: data, sharded step, eval, checkpoints, logs, plots.

    summary = train(cfg, workdir)

Workdir layout: config.json (the resolved Config), checkpoints/ (orbax, see
onn_jax.io.checkpoint), metrics.jsonl and tb/ (see train.logging), plots/*.png (train.plots.figures).
If checkpoints/ holds a checkpoint the run resumes from the latest one: TrainState and the
data iterator position are restored, so the continuation equals an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import Config, ConfigError, MeshConfig, to_dict
from onn_jax.core.routing_metrics import dead_experts
from onn_jax.data.corpus import build_corpus
from onn_jax.data.dataset import Dataset, load_records
from onn_jax.data.records import DataError, is_chat_file
from onn_jax.data.tokenizer import load_tokenizer, prompt_ids
from onn_jax.io import checkpoint as ckpt_lib
from onn_jax.io.workdir import WorkdirBusy, WorkdirLock
from onn_jax.nn.attention import attention_impl
from onn_jax.nn.layer_stack import layer_params
from onn_jax.parallel import mesh as mesh_lib
from onn_jax.parallel.rules import check_batch
from onn_jax.training.guard import SKIPPED, make_guarded_step
from onn_jax.training.memory import memory_problem
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.schedules import last_lr, make_schedule
from onn_jax.training.sharded import abstract_state, shard_batch, sharded_init
from train.common.signals import StopOnSignal
from train.common.signals import name as signal_name
from train.common.workdir_check import check_workdir, meta_problem
from train.plots.dashboards import PlotError, make_dashboards
from train.run.compat import config_diff, tokenizer_info, tokenizer_mismatch
from train.run.evaluate import evaluate, make_eval_step
from train.run.faults import Faults
from train.run.metrics_writer import MetricsWriter, NullWriter, mean_metrics
from train.run.output_order import with_output_order
from train.run.perf import perf_metrics
from train.run.progress import Progress

CONFIG_FILE, CHECKPOINT_DIR = "config.json", "checkpoints"
RESUME_FREE_DATA_FIELDS = ("strict",)  # data fields that do not change the batch stream
# model/optim fields a resume may change freely (same math, another kernel); any other change
# of model.* or optim.* alters the run's semantics and needs --allow-config-change.
RESUME_FREE_MODEL_FIELDS = ("model.attention",)


def semantic_changes(saved_config: dict | None, cfg: Config) -> list[str]:
    """`field saved -> now` for every model/optim field (but RESUME_FREE_MODEL_FIELDS) that
    differs between a checkpoint's config and `cfg`."""
    saved_config = saved_config or {}
    diff = []
    for section in ("model", "optim"):
        saved = saved_config.get(section)
        if saved is None:
            continue
        now = _only_keys_of(to_dict(getattr(cfg, section)), saved)  # fields newer than the run: skip
        diff += [d for d in config_diff(saved, now, section) if d.split()[0] not in RESUME_FREE_MODEL_FIELDS]
    return diff


def _only_keys_of(now: Any, saved: Any) -> Any:
    """`now` restricted to the keys `saved` has (nested dicts)."""
    if isinstance(now, dict) and isinstance(saved, dict):
        return {k: _only_keys_of(now[k], saved[k]) for k in saved if k in now}
    return now


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why (field, file or checkpoint)."""


class TrainStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps in a row) after a checkpoint."""


class StoppedBySignal(RuntimeError):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) ended the run at a step boundary, after saving
    that step; `code` is the exit code (128 + signal), `hard` that a save was abandoned and
    still runs in a background thread, so the process must end with os._exit."""

    def __init__(self, message: str, code: int, hard: bool = False):
        super().__init__(message)
        self.code, self.hard = code, hard


class SaveFailed(RuntimeError):
    """A checkpoint save failed (disk full, I/O error); the run stopped at once. The message
    names the cause and the last committed checkpoint."""


def build_dataset(cfg: Config) -> Dataset:
    """The tokenizer and the train/eval dataset of cfg.data (builtin corpus or user files)."""
    d = cfg.data
    try:
        tok = load_tokenizer(d.tokenizer)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"data.tokenizer: {e}") from e
    if tok.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"model.vocab_size: must be >= the tokenizer's vocab size "
                         f"{tok.vocab_size} ({d.tokenizer}), got {cfg.model.vocab_size}")
    if d.source.startswith("shards:"):
        return open_shards(cfg, tok)
    try:
        if d.source == "builtin":
            records = build_corpus(seed=d.seed, records_per_domain=d.records_per_domain)
        else:
            records = load_records([p.strip() for p in d.source.split(",") if p.strip()])
        return Dataset(records, tok, d.seq_len, d.eval_fraction, pack=d.pack, strict=d.strict)
    except DataError as e:
        raise TrainError(f"data.source: {e}") from e
    except ValueError as e:
        raise TrainError(f"data: {e}") from e


def vocab_from_tokenizer(cfg: Config) -> Config:
    """cfg with model.vocab_size = the tokenizer's size, for a tokenizer.json (onn-train does this
    unless --config.model.vocab_size is given). Unchanged if the tokenizer cannot be loaded
    (build_dataset then reports why) or is the byte tokenizer."""
    import dataclasses
    if cfg.data.tokenizer == "byte":
        return cfg
    try:
        size = load_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError, ImportError):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))


def open_shards(cfg: Config, tok):
    """The ShardDataset of data.source=shards:DIR, checked against cfg.data and the tokenizer."""
    from onn_jax.data.shards import PREFIX, ShardDataset
    d = cfg.data
    try:
        ds = ShardDataset(d.source[len(PREFIX):], tok)
    except (DataError, ValueError) as e:
        raise TrainError(f"data.source: {e}") from e
    meta, where = ds.meta, d.source[len(PREFIX):]
    for field, want in (("seq_len", d.seq_len), ("pack", d.pack), ("eval_fraction", d.eval_fraction)):
        if meta.get(field) != want:
            raise TrainError(f"data.{field}: the shards in {where} were made with {field} {meta.get(field)!r}, "
                             f"this run has {want!r}; set --config.data.{field}={meta.get(field)!r} "
                             "or tokenize again")
    mismatch = tokenizer_mismatch(meta.get("tokenizer"), tokenizer_info(d.tokenizer, tok), f"shards {where}")
    if mismatch:
        raise TrainError(mismatch.replace(" was trained with ", " were made with "))
    return ds


def run_mesh(cfg: MeshConfig):
    """The device mesh; a fully specified shape uses the first data*expert*fsdp devices."""
    devices = jax.devices()
    sizes = (cfg.data, cfg.expert, cfg.fsdp)
    if -1 not in sizes:
        devices = devices[:math.prod(sizes)]
    try:
        return mesh_lib.make_mesh(cfg, devices)
    except ConfigError as e:
        raise TrainError(str(e)) from e


def sample_as_text(cfg: Config) -> bool:
    """Whether the run's sample prompt is plain text (BOS + prompt) rather than a user turn:
    train.sample_format, where `auto` means the corpus is only plain-text files."""
    fmt = cfg.train.sample_format
    if fmt != "auto":
        return fmt == "text"
    source = cfg.data.source
    if source == "builtin" or source.startswith("shards:"):
        return False
    return not any(is_chat_file(p.strip()) for p in source.split(","))


def sample(params: Any, cfg: Config, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`, encoded as the corpus was trained (sample_as_text); the
    new tokens are clamped to the room model.max_len leaves after the prompt (as onn-generate does)."""
    from onn_jax.nn.generate import generate
    ids = prompt_ids(tok, prompt, raw=sample_as_text(cfg))
    room = cfg.model.max_len - len(ids)
    if room < 1:
        return f"(prompt of {len(ids)} tokens does not fit model.max_len {cfg.model.max_len})"
    out = generate(params, cfg.model, ids, max_new_tokens=min(max_new_tokens, room), temperature=0.0,
                   eos_id=tok.eos_id, vocab_limit=min(tok.vocab_size, cfg.model.vocab_size))
    return tok.decode(out)


class Run:
    """One invocation of the loop; attributes hold what the summary reports.

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
        created = self._open_workdir()
        try:
            self._setup()
        except BaseException:
            self.close()
            if created:  # leave no empty workdir behind a run that never started
                try:
                    os.rmdir(self.workdir)
                except OSError:
                    pass
            raise

    def _open_workdir(self) -> bool:
        """Creates the workdir (True if it was new) and takes its lock (process 0)."""
        w = self.workdir
        created = not w.exists()
        try:
            w.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise TrainError(f"--workdir {w}: exists and is not a directory") from None
        except OSError as e:
            raise TrainError(f"--workdir {w}: cannot create it ({e.strerror or e})") from None
        if jax.process_index() == 0:
            try:
                self.lock = WorkdirLock(w).acquire()
            except WorkdirBusy as e:
                raise TrainError(str(e)) from None
            except OSError as e:
                raise TrainError(f"--workdir {w}: not writable ({e.strerror or e})") from None
            self.stop.at_exit.append(self.lock.release)  # a second signal ends the process at once
            problem = None if created else check_workdir(w, to_dict(self.cfg), self.cfg.checkpoint.enabled)
            if problem:
                self.close()
                raise TrainError(problem)
            if self.lock.stale:
                print(f"onn-train: note: took over the lock of a process that ended without releasing "
                      f"it ({self.lock.stale})", flush=True)
        return created

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
        if not self.is_chief:  # only process 0 writes the workdir's logs, config and plots
            return
        try:
            self.writer = MetricsWriter(self.workdir, resume_step=self.start_step + 1 if self.start_step else 0)
        except ValueError as e:
            raise TrainError(f"cannot append to the run's metrics: {e}") from e
        tmp = self.workdir / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        os.replace(tmp, self.workdir / CONFIG_FILE)  # atomic: a kill never leaves half a file

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

    def _batch(self):
        host = next(self.data_iter)
        return self._place({k: host[k] for k in ("inputs", "targets", "loss_mask")})

    def _place(self, host: dict) -> dict:
        """A host batch (this process's rows of a global batch) as a global array on the mesh."""
        if jax.process_count() == 1:
            return shard_batch(host, self.mesh)
        from onn_jax.parallel.distributed import global_batch  # multi-process: this process's rows only
        return global_batch(host, self.mesh, self.cfg.data.batch_size)

    def evaluate(self) -> dict[str, Any]:
        batches = self.ds.eval_batches(self.cfg.data.batch_size, jax.process_index(), jax.process_count())
        limited = self._eval_hooked(b for b, _ in zip(batches, range(self.cfg.train.eval_batches)))
        metrics = evaluate(self.eval_fn, self.state.model_params, limited, place=self._place)
        metrics["eval/domain_names"] = list(self.ds.domains)
        return metrics

    def _eval_hooked(self, batches):
        for i, b in enumerate(batches):
            yield b
            if i == 0:
                self.faults.at("in_eval", int(jax.device_get(self.state.step)))

    def thresholds(self) -> dict[str, np.ndarray]:
        p = self.state.params
        if self.cfg.model.moe.router != "surprise":
            return {}
        theta = [layer_params(p, i)["moe"]["thresholds"] for i in range(self.cfg.model.num_layers)]
        return {"moe/thresholds": np.asarray(jax.device_get(jax.nn.sigmoid(jnp.stack(theta))))}

    def _account(self, step: int, flag: Any) -> None:
        """Counts step's guard flag; TrainStopped-worthy when too many were skipped in a row."""
        if int(jax.device_get(flag)):
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            self.bar.write(f"step {step}: loss or gradients not finite; update skipped "
                           f"({self.skipped_in_a_row} in a row, {self.skipped_total} in all)")
        else:
            self.skipped_in_a_row = 0

    def _log_row(self, pending: list, step: int) -> dict[str, Any]:
        """Means of the pending step metrics over the steps that were not skipped."""
        host = jax.device_get(pending)
        good = [m for m in host if not int(m[SKIPPED])] or host
        row = mean_metrics({k: v for k, v in m.items() if k != SKIPPED} for m in good)
        row["train/skipped"] = float(np.mean([int(m[SKIPPED]) for m in host]))
        row["train/skipped_steps"] = self.skipped_total
        return row

    def run(self) -> dict[str, Any]:
        """Trains up to train.steps; releases the workdir lock when done (or failed)."""
        try:
            return self._run()
        except ckpt_lib.SaveError as e:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
            raise SaveFailed(f"{e} in {self.workdir / CHECKPOINT_DIR}; training stopped at once. Free "
                             "space (or fix the disk) and rerun the same command to resume from the last "
                             "committed checkpoint") from None
        except KeyboardInterrupt:
            if self.ckpt is not None:  # let an asynchronous save in flight commit (or fail) cleanly
                try:
                    self.ckpt.close()
                except Exception:  # noqa: BLE001 - an unfinished save is cleaned up on the next start
                    pass
            raise
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        writer = self.writer
        bar = self.bar = Progress(t.steps, self.start_step, enabled=t.progress,
                                   silent=not self.is_chief)  # one process speaks
        if self.start_step:
            bar.write(f"resuming from step {self.start_step} ({self.workdir / CHECKPOINT_DIR})")
        pending, first_loss, last, compile_logged = [], None, {}, False
        if self.start_step >= t.steps:  # evaluate the checkpoint instead (nothing is written)
            bar.write(f"already at step {self.start_step} >= train.steps = {t.steps}: nothing to train; "
                      "evaluating the checkpoint")
            last = {k: v for k, v in self.evaluate().items() if np.ndim(v) == 0}
            if "eval/main_loss" in last:
                bar.write(f"eval at step {self.start_step}: loss {last['eval/main_loss']:.4f}, "
                          f"acc {last.get('eval/main_acc', 0):.3f} over {int(last['eval/tokens'])} tokens")
        interval_start, interval_steps = time.perf_counter(), 0
        step, flag = self.start_step, None  # flag: (step, device 0/1) not yet counted
        profile = t.profile_steps if self.is_chief else None
        while step < t.steps:
            if self._stop_signal() is not None:  # a stop signal came during the last step, eval or save
                self._stop_on_signal(step)
            if profile and step + 1 == profile[0]:
                jax.profiler.start_trace(str(self.workdir / "profile"))
            self.state, metrics = self.step_fn(self.state, self._batch())
            step += 1
            if profile and step == min(profile[1], t.steps) and step >= profile[0]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                bar.write(f"profile of steps {profile[0]}..{step} written to {self.workdir / 'profile'}")
            if flag is not None:  # read one step late, so the host never waits on the device
                self._account(*flag)
            flag = (step, metrics[SKIPPED])
            pending.append(metrics)
            interval_steps += 1
            bar.update()
            if step == self.start_step + 1:  # exclude compilation from the throughput figures
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - interval_start
                interval_start, interval_steps = time.perf_counter(), 0
            every = lambda n: n > 0 and step % n == 0
            stop = self.skipped_in_a_row >= t.max_skipped_in_a_row
            do_eval = (every(t.eval_every) or step == t.steps) and not stop
            do_sample = every(t.sample_every) and step != t.steps and not stop  # the end always samples
            if every(t.log_every) or step in (1, t.steps) or do_eval or do_sample or stop:  # 1: initial loss
                self._account(*flag)
                flag = None
                stop = self.skipped_in_a_row >= t.max_skipped_in_a_row
                row = self._log_row(pending, step)
                pending = []
                elapsed = time.perf_counter() - interval_start
                if interval_steps:
                    row["perf/step_time_s"] = elapsed / interval_steps
                    row["perf/tokens_per_sec"] = tokens_per_step * interval_steps / max(elapsed, 1e-9)
                    row.update(perf_metrics(cfg, row, elapsed / interval_steps))
                row["train/lr"] = last_lr(self.lr, self.state.opt_state, step)
                if not compile_logged:
                    row["perf/compile_s"], compile_logged = compile_s, True
                row.update(self.thresholds())
                if "moe/expert_load" in row:  # experts below the load floor over this logging window
                    row["moe/dead_experts"] = dead_experts(row["moe/expert_load"])
                if self.pending_change:  # a semantic config change accepted on this resume
                    row["config/changed_on_resume"], self.pending_change = self.pending_change, None
                row["train/epoch"] = self.data_iter.state()["epoch"]
                if do_eval:
                    row.update(self.evaluate())
                if do_sample:
                    text = self._sample()
                    bar.write(f"step {step} sample: {t.sample_prompt!r} -> {text!r}")
                    writer.add_text("sample", text, step)
                last = writer.write(step, row)
                first_loss = last.get("train/main_loss") if first_loss is None else first_loss
                bar.show(last)
                interval_start, interval_steps = time.perf_counter(), 0
            if stop:
                self._stop(step)
            if self.ckpt is not None:
                if step % cfg.checkpoint.every == 0 or step == t.steps:
                    self.faults.at("at_save", step)
                    if not self._previous_save_done():
                        self._stop_on_signal(step)
                    self.ckpt.save(step, self.state, self._meta(), force=step == t.steps)
                self.ckpt.poll()  # a failed asynchronous save stops the run now
            self.faults.after_step(step, self.ckpt)
        if flag is not None:
            self._account(*flag)
        if self._stop_signal() is not None:
            self._stop_on_signal(step)
        bar.close()
        if self.ckpt is not None:
            self.ckpt.close()  # waits for the asynchronous saves
        text = self._sample()
        writer.add_text("sample", text, step)
        writer.close()
        try:
            plots = (make_dashboards(self.workdir) if self.cfg.train.plots and self.is_chief
                     and (self.workdir / "metrics.jsonl").exists() else [])
        except (PlotError, OSError) as e:  # after a whole run: say so, keep the run's exit code
            print(f"onn-train: warning: no plots drawn: {e}", file=sys.stderr, flush=True)
            plots = []
        return {"workdir": str(self.workdir), "start_step": self.start_step, "step": step,
                "first_loss": first_loss, "last": last, "sample": text, "plots": [str(p) for p in plots],
                "skipped_steps": self.skipped_total}

    def _previous_save_done(self) -> bool:
        """Waits for a save in flight (orbax would, inside the next save, where no signal can
        end the wait); False when a stop signal came first."""
        while not self.ckpt.wait(timeout=0.1):
            if self.stop.signum is not None and jax.process_count() == 1:  # processes stop together
                return False
        return True

    def _stop_signal(self) -> int | None:
        """The stop signal received (by any process of a multi-process run, so that all of
        them stop at the same step and save it together), else None."""
        mine = self.stop.signum
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils
        anyone = int(np.max(multihost_utils.process_allgather(np.int32(mine or 0))))
        return anyone or None

    def _stop_on_signal(self, step: int) -> None:
        """Saves `step` (unless saved), waits up to checkpoint.stop_timeout_s for the saves,
        closes the logs and raises StoppedBySignal saying where the rerun resumes."""
        signum, ckpt_dir = self._stop_signal(), self.workdir / CHECKPOINT_DIR
        hard, code = False, 128 + signum
        if self.ckpt is None:
            where = f"no checkpoint saved (checkpoint.enabled is false); stopped after step {step}"
        else:
            timeout, t0 = self.cfg.checkpoint.stop_timeout_s, time.monotonic()
            done = self.ckpt.wait(timeout=timeout)  # a save in flight first: orbax would wait inside save()
            if done and step > self.start_step:
                self.ckpt.save(step, self.state, self._meta(), force=True)
                done = self.ckpt.wait(timeout=max(timeout - (time.monotonic() - t0), 0.0))
            if done and step > self.start_step:
                where = f"saved step {step} in {ckpt_dir}; rerun the same command to resume from it"
            elif done:
                where = (f"nothing trained since step {step}; rerun the same command to "
                         + (f"resume from it ({ckpt_dir})" if step else "start again"))
            else:
                hard = self.abandoned = True
                committed = self.ckpt.committed_steps()
                last = f"step {committed[-1]}" if committed else "the start (no checkpoint)"
                where = (f"checkpoint saves did not finish within checkpoint.stop_timeout_s = {timeout:g}s "
                         f"and were abandoned (step {step} not saved); rerun the same command to resume "
                         f"from {last}")
        self.bar.close()
        self.writer.close()
        raise StoppedBySignal(f"stopped by {signal_name(signum)}: {where}", code, hard)

    def _stop(self, step: int) -> None:
        """Too many non-finite steps in a row: checkpoint (the last finite state) and stop."""
        n, where = self.skipped_in_a_row, "no checkpoint (checkpoint.enabled is false)"
        if self.ckpt is not None:
            self.ckpt.save(step, self.state, self._meta(), force=True)
            self.ckpt.close()
            where = f"a checkpoint at step {step} in {self.workdir / CHECKPOINT_DIR}"
        self.bar.close()
        self.writer.close()
        raise TrainStopped(
            f"{n} steps in a row (up to step {step}) had a non-finite loss or gradients "
            f"(train.max_skipped_in_a_row = {self.cfg.train.max_skipped_in_a_row}); the parameters are "
            f"those of the last finite step, saved as {where}. Lower optim.lr, set optim.clip_norm, or "
            f"check the data before position {self.data_iter.state()}; rerunning resumes past these batches")

    def _sample(self) -> str:
        return sample(self.state.model_params, self.cfg, self.tok, self.cfg.train.sample_prompt,
                      self.cfg.train.sample_tokens)


def tensorboard_command(logdir: Path) -> str:
    """How to view the events: the command, and how to install the viewer where it is missing."""
    import importlib.util
    cmd = f"tensorboard --logdir {logdir}"
    if importlib.util.find_spec("tensorboard") is None:
        cmd += "  (viewer not installed: pip install -e '.[tb]' in the repository)"
    return cmd


def train(cfg: Config, workdir: str | Path, quiet: bool = False,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir`; prints where everything went and a sample.

    A resume whose model/optim config differs from the checkpoint's is refused unless
    `allow_config_change` (then the change is recorded in metrics.jsonl and the checkpoints).
    Raises TrainError (bad input, workdir in use) or TrainStopped (too many non-finite steps)."""
    run = Run(cfg, workdir, allow_config_change)
    try:
        summary = run.run()
    finally:
        run.close()
    if not quiet and jax.process_index() == 0:
        print(report(summary, cfg))
    return summary


def report(summary: dict[str, Any], cfg: Config) -> str:
    """The end-of-run text: losses, outputs and the sample generation."""
    w, last = Path(summary["workdir"]), summary["last"]
    lines = [f"trained steps {summary['start_step']} -> {summary['step']}"]
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss or gradients): {summary['skipped_steps']}")
    if summary["first_loss"] is not None and last.get("train/main_loss") is not None:
        lines.append(f"main loss {summary['first_loss']:.4f} (first log) -> {last['train/main_loss']:.4f}")
    if last.get("eval/main_loss") is not None:
        lines.append(f"eval loss {last['eval/main_loss']:.4f}, eval acc {last.get('eval/main_acc', 0):.3f}")
    lines += [f"  config       {w / CONFIG_FILE}",
              f"  checkpoints  {w / CHECKPOINT_DIR}" + ("" if cfg.checkpoint.enabled else " (disabled)"),
              f"  metrics      {w / 'metrics.jsonl'}",
              f"  tensorboard  {tensorboard_command(w / 'tb')}",
              "  plots        " + (", ".join(Path(p).name for p in summary["plots"]) + f" in {w / 'plots'}"
                                    if summary["plots"] else "(none)"),
              f"sample (greedy): {cfg.train.sample_prompt!r} -> {summary['sample']!r}"]
    return "\n".join(lines)
