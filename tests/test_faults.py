"""Faults: kill -9 during training and during a checkpoint save, then resume; the workdir lock.

The subprocess runs stop at a chosen point through train.run.faults (ONN_TRAIN_FAULT) and are then
killed with SIGKILL by the test, so the timing is deterministic. On CPU the resumed run's
final parameters equal an uninterrupted run's bit for bit.
"""
import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from onn_jax.io.checkpointer import TMP_MARK, Checkpointer  # noqa: E402
from onn_jax.io.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock  # noqa: E402
from train.common.metrics_file import read_metrics  # noqa: E402
from train.main import main  # noqa: E402
from train.run import faults  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tiny.py", "--config.train.steps=12", "--config.checkpoint.every=4",
        "--config.train.eval_every=0", "--config.train.log_every=4", "--config.train.eval_batches=1",
        "--config.train.sample_tokens=2", "--config.train.plots=false"]


def cli(workdir, fault=None, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("ONN_TRAIN_FAULT", None)
    if fault:
        env["ONN_TRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "train.main", "--workdir", str(workdir), *ARGS]
    return cmd, dict(cwd=ROOT, env=env, **kwargs)


def run_cli(workdir):
    """A run to the end with no fault point, in this process (train.main.main, as onn-train calls
    it): the straight run and the resumes after a stop, which check files, exit code and stdout,
    not the process boundary; the fault-point runs above are real onn-train processes."""
    assert faults.ENV not in os.environ
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--workdir", str(workdir), *ARGS])
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def reap(proc):
    """Kills `proc` if it still runs and waits for it (no zombie, no trainer left asleep)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.fixture
def procs():
    """Registers started subprocesses; every one is killed and waited for at teardown, also when
    the test failed before its own kill."""
    started = []
    yield started
    for proc in started:
        reap(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def start_until_fault(workdir, fault, log, procs):
    """Starts onn-train and returns the process once it is halted at the fault point."""
    cmd, kw = cli(workdir, fault)
    kw["env"][faults.TIMEOUT_ENV] = "300"  # exits by itself should the test never kill it
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kw)
    procs.append(proc)
    deadline = time.monotonic() + 120
    while f"fault point {fault} reached" not in Path(log).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            reap(proc)
            pytest.fail(f"no fault point (rc {proc.poll()}): {Path(log).read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def final_params(workdir, step=12):
    with Checkpointer(Path(workdir) / "checkpoints", read_only=True) as ckpt:
        params, _ = ckpt.restore_params(step=step)
    return params


def assert_bitwise_equal(a, b):
    import jax
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def tree_hash(root):
    h = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 12-step run (checkpoints every 4 steps)."""
    workdir = tmp_path_factory.mktemp("straight")
    out = run_cli(workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.slow
def test_kill_during_training_resumes_bit_for_bit(straight, tmp_path, capsys, procs):
    workdir = tmp_path / "w"
    proc = start_until_fault(workdir, "after_step:10", tmp_path / "err.txt", procs)
    # while it runs, a second trainer on the same workdir refuses and changes nothing
    before = tree_hash(workdir)
    capsys.readouterr()
    assert main(["--workdir", str(workdir), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another onn-train (pid {proc.pid}" in err and "Traceback" not in err
    assert tree_hash(workdir) == before
    kill9(proc)
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [4, 8]  # keep=2
    assert (workdir / LOCK_FILE).read_text().split()[0] == str(proc.pid)  # left behind by the kill
    out = run_cli(workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "took over the lock" in out.stdout and "resuming from step 8" in out.stdout
    assert not (workdir / LOCK_FILE).exists()
    assert_bitwise_equal(final_params(workdir), final_params(straight))
    assert [r["step"] for r in read_metrics(workdir)] == [r["step"] for r in read_metrics(straight)]
    assert read_metrics(workdir)[-1]["train/main_loss"] == read_metrics(straight)[-1]["train/main_loss"]


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_last_committed(straight, tmp_path, procs):
    workdir = tmp_path / "w"
    kill9(start_until_fault(workdir, "in_save:8", tmp_path / "err.txt", procs))
    ckpt_dir = workdir / "checkpoints"
    tmp = [p.name for p in ckpt_dir.iterdir() if TMP_MARK in p.name]
    assert len(tmp) == 1 and tmp[0].startswith("8.")  # written, never renamed into place
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [4]  # the interrupted save is not a checkpoint
    out = run_cli(workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "interrupted checkpoint save" in out.stdout and "resuming from step 4" in out.stdout
    assert not [p for p in ckpt_dir.iterdir() if TMP_MARK in p.name]
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        assert ckpt.all_steps() == [8, 12]
    assert_bitwise_equal(final_params(workdir), final_params(straight))
    assert_bitwise_equal(final_params(workdir, 8), final_params(straight, 8))


def test_lock_excludes_a_second_holder_and_is_removed(tmp_path):
    with WorkdirLock(tmp_path) as lock:
        assert lock.stale is None
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(WorkdirBusy, match=rf"in use by another onn-train \(pid {os.getpid()}, lock file"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with WorkdirLock(tmp_path):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(f"{dead} somehost\n")
    with WorkdirLock(tmp_path) as lock:
        assert lock.stale == f"{dead} somehost"
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_lock_held_by_another_process(tmp_path, procs):
    code = ("import sys, time; from onn_jax.io.workdir import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    procs.append(proc)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid}"):
        WorkdirLock(tmp_path).acquire()
    kill9(proc)
    with WorkdirLock(tmp_path) as lock:  # the kernel dropped the dead holder's flock
        assert lock.stale.split()[0] == str(proc.pid)


def test_halt_exits_by_itself_when_nobody_kills_it(procs):
    code = "from train.run.faults import halt; halt('after_step', 3)"
    env = dict(os.environ, **{faults.TIMEOUT_ENV: "0.5"})
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == faults.TIMEOUT_EXIT_CODE
    assert "fault point after_step:3 reached" in err and "not killed within 0.5s; exiting" in err


def test_bad_halt_timeout_is_refused_at_start(monkeypatch):
    monkeypatch.setenv(faults.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=faults.TIMEOUT_ENV):
        faults.Faults("after_step:3")
    assert faults.halt_timeout("") == faults.DEFAULT_TIMEOUT_S and faults.halt_timeout("2") == 2.0


# ---------------------------------------------------------------- stop signals and failed saves
# Each trial starts onn-train at a fault point, sends a signal (or none: a save that fails as on a
# full disk) and checks the exit code, the one stderr line, the checkpoints; the next trial resumes
# the same workdir, so one chain of runs also checks that every stop resumes bit for bit.

def stop_at(workdir, fault, sig, tmp_path, procs, extra=(), second=None):
    """Runs onn-train to `fault`, sends `sig` (then `second` a moment later, if given) and returns
    (exit code, its onn-train lines other than the fault point's)."""
    log = tmp_path / f"{Path(workdir).name}_{fault.replace(':', '_')}.txt"
    cmd, kw = cli(workdir, fault)
    cmd += list(extra)
    kw["env"][faults.TIMEOUT_ENV] = "120"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kw)
    procs.append(proc)
    deadline = time.monotonic() + 150
    while f"fault point {fault} reached" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    if sig is not None:
        os.kill(proc.pid, sig)
    if second is not None:
        time.sleep(1.0)
        os.kill(proc.pid, second)
    rc = proc.wait(timeout=150)
    text = log.read_text()
    assert "Traceback" not in text and "Error" not in text.replace("errno", ""), text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip() and "fault point" not in ln]
    return rc, lines


def steps_of(workdir):
    with Checkpointer(Path(workdir) / "checkpoints", read_only=True) as ckpt:
        return ckpt.all_steps()


@pytest.mark.slow
def test_stop_signals_save_the_step_and_resume_bit_for_bit(straight, tmp_path, procs):
    w, ckpts = tmp_path / "w", tmp_path / "w" / "checkpoints"
    # between steps (the loop's boundary): SIGTERM saves step 3, off the checkpoint.every cadence
    rc, lines = stop_at(w, "after_step:3", signal.SIGTERM, tmp_path, procs)
    assert rc == 143 and lines == [f"onn-train: stopped by SIGTERM: saved step 3 in {ckpts}; rerun the same "
                                   "command to resume from it"], lines
    assert steps_of(w) == [3] and not (w / LOCK_FILE).exists()
    # Ctrl-C as the save of step 4 starts (issue: KeyboardInterrupt inside orbax's save hung)
    rc, lines = stop_at(w, "at_save:4", signal.SIGINT, tmp_path, procs)
    assert rc == 130 and lines == [f"onn-train: stopped by SIGINT: saved step 4 in {ckpts}; rerun the same "
                                   "command to resume from it"], lines
    # during an evaluation (eval_every does not change the parameters)
    rc, lines = stop_at(w, "in_eval:6", signal.SIGTERM, tmp_path, procs, ["--config.train.eval_every=6"])
    assert rc == 143 and lines == [f"onn-train: stopped by SIGTERM: saved step 6 in {ckpts}; rerun the same "
                                   "command to resume from it"], lines
    assert [r["step"] for r in read_metrics(w) if "eval/main_loss" in r] == [6]
    # SIGHUP while step 8 is written in the background: that save commits, then the current step
    rc, lines = stop_at(w, "in_save:8", signal.SIGHUP, tmp_path, procs)
    assert rc == 129 and len(lines) == 1 and lines[0].startswith("onn-train: stopped by SIGHUP: saved step "), lines
    stopped = int(lines[0].split("saved step ")[1].split()[0])
    assert 8 <= stopped <= 12 and {8, stopped} <= set(steps_of(w)), (stopped, steps_of(w))
    assert not [p for p in ckpts.iterdir() if TMP_MARK in p.name]
    # after the last step (its save committed), as the final sample runs (issue 26.5: ignored, exit 0)
    rc, lines = stop_at(w, "after_train:12", signal.SIGINT, tmp_path, procs)
    assert rc == 130 and lines == [f"onn-train: stopped by SIGINT: saved step 12 in {ckpts}; rerun the same "
                                   "command to resume from it"], lines
    assert not (w / LOCK_FILE).exists() and steps_of(w)[-1] == 12
    assert_bitwise_equal(final_params(w), final_params(straight))


@pytest.mark.slow
def test_stuck_save_second_signal_and_full_disk(straight, tmp_path, procs):
    w = tmp_path / "w"
    # a save that never finishes: a second signal ends the process at once, lock file removed
    w1 = tmp_path / "w1"
    rc, lines = stop_at(w1, "stall_save:4", signal.SIGTERM, tmp_path, procs, second=signal.SIGTERM)
    assert rc == 143 and lines == ["onn-train: second signal (SIGTERM): stopping at once without saving; rerun "
                                   "the same command to resume from the last committed checkpoint"], lines
    assert not (w1 / LOCK_FILE).exists() and steps_of(w1) == []
    # ... and without a second signal it is abandoned after checkpoint.stop_timeout_s
    quick = ["--config.checkpoint.stop_timeout_s=1"]
    rc, lines = stop_at(w, "stall_save:4", signal.SIGTERM, tmp_path, procs, quick)
    assert rc == 143 and len(lines) == 1, lines
    assert lines[0].startswith("onn-train: stopped by SIGTERM: checkpoint saves did not finish within "
                               "checkpoint.stop_timeout_s = 1s and were abandoned (step ") and lines[0].endswith(
        "not saved); rerun the same command to resume from the start (no checkpoint)"), lines
    assert not (w / LOCK_FILE).exists()
    # a full disk in the save of step 8: the run stops at once, naming the cause and step 4
    rc, lines = stop_at(w, "enospc_save:8", None, tmp_path, procs, quick)  # the same run, from scratch
    assert rc == 4 and len(lines) == 1, lines
    assert lines[0].startswith("onn-train: error: the checkpoint save of step 8 failed: No space left on device "
                               "(errno 28)") and "last committed checkpoint: step 4 in" in lines[0], lines
    assert steps_of(w) == [4] and not (w / LOCK_FILE).exists()
    rows = read_metrics(w)
    assert rows and rows[-1]["step"] <= 12
    # resumed from step 4: SIGTERM while the final save (step 12) is written stops the run once
    # that save commits (issue 26.5: the signal was ignored and the run went on to exit 0)
    rc, lines = stop_at(w, "in_save:12", signal.SIGTERM, tmp_path, procs)
    assert rc == 143 and lines == [f"onn-train: stopped by SIGTERM: saved step 12 in {w / 'checkpoints'}; rerun "
                                   "the same command to resume from it"], lines
    assert steps_of(w) == [8, 12] and read_metrics(w)[-1]["step"] == 12
    assert_bitwise_equal(final_params(w), final_params(straight))
