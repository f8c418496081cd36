"""Faults: kill -9 during training and during a checkpoint save, then resume; the workdir lock.

The subprocess runs stop at a chosen point through train.faults (ONN_TRAIN_FAULT) and are then
killed with SIGKILL by the test, so the timing is deterministic. On CPU the resumed run's
final parameters equal an uninterrupted run's bit for bit.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from onn_jax.checkpoint import TMP_MARK, Checkpointer  # noqa: E402
from onn_jax.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock  # noqa: E402
from train import faults  # noqa: E402
from train.logging import read_metrics  # noqa: E402
from train.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tiny.py", "--config.train.steps=12", "--config.checkpoint.every=4",
        "--config.train.eval_every=0", "--config.train.log_every=4", "--config.train.eval_batches=1",
        "--config.train.sample_tokens=2"]


def cli(workdir, fault=None, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("ONN_TRAIN_FAULT", None)
    if fault:
        env["ONN_TRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "train.main", "--workdir", str(workdir), *ARGS]
    return cmd, dict(cwd=ROOT, env=env, **kwargs)


def run_cli(workdir):
    cmd, kw = cli(workdir)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)


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
    code = ("import sys, time; from onn_jax.workdir import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
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
    code = "from train.faults import halt; halt('after_step', 3)"
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
