"""The training loop behind `onn-train`: sharded steps, logs, evals, samples, checkpoints, stops.

    summary = train(cfg, workdir)

Workdir layout: config.json (the resolved Config), checkpoints/ (orbax, see
onn_jax.io.checkpointer), metrics.jsonl and tb/ (see train.run.metrics_writer), plots/*.png
(train.plots). If checkpoints/ holds a checkpoint the run resumes from the latest one: TrainState
and the data iterator position are restored (train.run.setup), so the continuation equals an
uninterrupted run. A stop signal ends the run at a step boundary after saving that step; too
many non-finite steps in a row stop it with a checkpoint (train.run.errors).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax import io as ckpt_lib
from onn_jax.config import Config
from onn_jax.core.routing_metrics import dead_experts
from onn_jax.io.errors import error_cause
from onn_jax.nn.layer_stack import layer_params
from onn_jax.training.guard import SKIPPED
from onn_jax.training.schedules import last_lr
from onn_jax.training.sharded import shard_batch
from train.common.signals import name as signal_name
from train.common.workdir_check import CHECKPOINT_DIR
from train.plots.dashboards import PlotError, make_dashboards
from train.run.errors import SaveFailed, StoppedBySignal, TrainError, TrainStopped
from train.run.evaluate import evaluate
from train.run.metrics_writer import LogWriteError, mean_metrics
from train.run.oom import is_out_of_memory, out_of_memory_message
from train.run.perf import perf_metrics
from train.run.progress import Progress
from train.run.report import report
from train.run.sample import sample
from train.run.setup import RunSetup


class Run(RunSetup):
    """One invocation of the loop: RunSetup's checked set-up, then run() trains up to train.steps,
    logging, evaluating, sampling and saving on the way (train() runs one and prints its report)."""

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
        """Trains up to train.steps; releases the workdir lock when done (or failed). A failure
        before the first step's outputs are written undoes the start (RunSetup.abandon_start)."""
        try:
            return self._run()
        except ckpt_lib.SaveError as e:
            self._close_outputs()
            raise SaveFailed(f"{e} in {self.workdir / CHECKPOINT_DIR}; training stopped at once. Free "
                             "space (or fix the disk) and rerun the same command to resume from the last "
                             "committed checkpoint") from None
        except TrainError:
            self._close_outputs()
            if not self.outputs_open:
                self.abandon_start()
            raise
        except LogWriteError as e:  # metrics.jsonl or tb/ could not be written (a full disk, an I/O error)
            self._close_outputs()
            if not self.outputs_open:
                self.abandon_start()
                raise TrainError(f"--workdir {self.workdir}: cannot write it: {error_cause(e)}; nothing of "
                                 "this run was kept. Free space (or fix the disk) and rerun") from None
            committed = self.ckpt.committed_steps() if self.ckpt is not None else []
            last = f"step {committed[-1]} in {self.workdir / CHECKPOINT_DIR}" if committed else "none"
            raise SaveFailed(f"cannot write the run's logs in {self.workdir}: {error_cause(e)}; training "
                             f"stopped at once (last committed checkpoint: {last}). Free space (or fix the "
                             "disk) and rerun the same command to resume from it") from None
        except Exception as e:
            self._close_outputs()
            message = None
            if is_out_of_memory(e):
                step = int(jax.device_get(self.state.step)) if self.outputs_open else 0
                message = out_of_memory_message(self.cfg, list(self.mesh.devices.flat), e, step)
            if not self.outputs_open:
                self.abandon_start()
            if message is None:  # a bug, or a collective that failed because a peer died
                raise
            raise TrainError(message) from None
        except KeyboardInterrupt:
            if self.ckpt is not None:  # let an asynchronous save in flight commit (or fail) cleanly
                try:
                    self.ckpt.close()
                except Exception:  # noqa: BLE001 - an unfinished save is cleaned up on the next start
                    pass
            raise
        finally:
            self.close()

    def _close_outputs(self) -> None:
        """Closes the progress bar and the logs after a failure (errors of a full disk ignored)."""
        if self.bar is not None:
            self.bar.close()
        try:
            self.writer.close()
        except OSError:
            pass

    def _run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        bar = self.bar = Progress(t.steps, self.start_step, enabled=t.progress,
                                   silent=not self.is_chief)  # one process speaks
        if self.start_step:
            bar.write(f"resuming from step {self.start_step} ({self.workdir / CHECKPOINT_DIR})")
        pending, first_loss, last, compile_logged = [], None, {}, False
        if self.start_step >= t.steps:  # evaluate the checkpoint instead (nothing is written)
            bar.write(f"already at step {self.start_step} >= train.steps = {t.steps}: nothing to train; "
                      "evaluating the checkpoint")
            last = {k: v for k, v in self.evaluate().items() if np.ndim(v) == 0}
            self.open_outputs()
            if "eval/main_loss" in last:
                bar.write(f"eval at step {self.start_step}: loss {last['eval/main_loss']:.4f}, "
                          f"acc {last.get('eval/main_acc', 0):.3f} over {int(last['eval/tokens'])} tokens")
        self.faults.at("in_start", self.start_step)
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
                jax.block_until_ready(metrics)  # XLA's out-of-memory surfaces here at the latest
                compile_s = time.perf_counter() - interval_start
                self.open_outputs()  # the start is over: config.json, metrics.jsonl, tb/
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
                    self.writer.add_text("sample", text, step)
                last = self.writer.write(step, row)
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
        # After the last step a stop signal still stops what is left (the wait for the final
        # save, the sample, the plots): each is followed by a check, as the steps are.
        if self.ckpt is not None:
            self._previous_save_done()  # the final save; a stop signal ends the wait (below)
        if self._stop_signal() is not None:
            self._stop_on_signal(step)
        bar.close()
        if self.ckpt is not None:
            self.ckpt.close()  # waits for the asynchronous saves
        self.faults.at("after_train", step)
        text = self._sample()
        self._stop_after_training(step)
        self.writer.add_text("sample", text, step)
        self.writer.close()
        try:
            plots = (make_dashboards(self.workdir) if self.cfg.train.plots and self.is_chief
                     and (self.workdir / "metrics.jsonl").exists() else [])
        except (PlotError, OSError) as e:  # after a whole run: say so, keep the run's exit code
            print(f"onn-train: warning: no plots drawn: {e}", file=sys.stderr, flush=True)
            plots = []
        self._stop_after_training(step)
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
        self._close_outputs()
        raise StoppedBySignal(f"stopped by {signal_name(signum)}: {where}", code, hard)

    def _stop_after_training(self, step: int) -> None:
        """A stop signal after the checkpoints were closed (during the final sample or plots):
        the final step is committed; raises StoppedBySignal with the documented line."""
        signum = self._stop_signal()
        if signum is None:
            return
        self._close_outputs()
        where = (f"saved step {step} in {self.workdir / CHECKPOINT_DIR}; rerun the same command to resume from it"
                 if self.ckpt is not None else
                 f"no checkpoint saved (checkpoint.enabled is false); stopped after step {step}")
        raise StoppedBySignal(f"stopped by {signal_name(signum)}: {where}", 128 + signum)

    def _stop(self, step: int) -> None:
        """Too many non-finite steps in a row: checkpoint (the last finite state) and stop."""
        n, where = self.skipped_in_a_row, "no checkpoint (checkpoint.enabled is false)"
        if self.ckpt is not None:
            self.ckpt.save(step, self.state, self._meta(), force=True)
            self.ckpt.close()
            where = f"a checkpoint at step {step} in {self.workdir / CHECKPOINT_DIR}"
        self._close_outputs()
        raise TrainStopped(
            f"{n} steps in a row (up to step {step}) had a non-finite loss or gradients "
            f"(train.max_skipped_in_a_row = {self.cfg.train.max_skipped_in_a_row}); the parameters are "
            f"those of the last finite step, saved as {where}. Lower optim.lr, set optim.clip_norm, or "
            f"check the data before position {self.data_iter.state()}; rerunning resumes past these batches")

    def _sample(self) -> str:
        return sample(self.state.model_params, self.cfg, self.tok, self.cfg.train.sample_prompt,
                      self.cfg.train.sample_tokens)


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
    if run.stop.signum is not None and jax.process_count() == 1:  # a signal as the run ended
        raise StoppedBySignal(f"stopped by {signal_name(run.stop.signum)}: "
                              + (f"saved step {summary['step']} in {Path(workdir) / CHECKPOINT_DIR}; rerun the "
                                 "same command to resume from it" if run.ckpt is not None else
                                 f"no checkpoint saved (checkpoint.enabled is false); stopped after step "
                                 f"{summary['step']}"), 128 + run.stop.signum)
    return summary
