"""onn-train launched as two processes on localhost (jax.distributed over CPU) equals one
process on as many devices; only process 0 writes the workdir's logs, and eval adds up the
rows of both processes. A process killed mid-run stops the survivor within
distributed.heartbeat_timeout_s with one line naming it and the checkpoint to resume from, and
the rerun of both resumes bit for bit; a launch that cannot work (a mesh that leaves devices out,
a coordinator nobody runs, processes that never join) is one line and exit code 2 (issue 26)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from cpu_flags import cpu_xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10
ARGS = ["--config", "configs/tiny.py", "--config.mesh.data=4", "--config.train.steps=10",
        "--config.train.log_every=5", "--config.train.eval_every=5", "--config.checkpoint.every=5",
        f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}"]
LAUNCH = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices, env_extra, args=ARGS):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=cpu_xla_flags(devices), **env_extra)
    for name in LAUNCH + ("ONN_TRAIN_FAULT",):
        if name not in env_extra:
            env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "train.main", *args, "--workdir", str(workdir)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launch_two(workdir, faults=("", ""), args=ARGS):
    port = free_port()
    return [launch(workdir, 2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                "JAX_PROCESS_ID": str(i), **({"ONN_TRAIN_FAULT": faults[i]} if faults[i] else {})},
                   args) for i in range(2)]


def finish(procs, timeout=300, codes=(0,)):
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, out, code in zip(procs, outs, codes * len(procs)):
        assert p.returncode == code, out[-3000:]
    return outs


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def own_lines(out: str) -> list[str]:
    """onn-train's own lines (not gloo's connection notes, not the progress lines)."""
    return [ln for ln in out.splitlines() if ln.startswith("onn-train:")]


def kill_at_fault(proc, point: str) -> float:
    """Reads `proc`'s output until its fault point `point` is reached (ONN_TRAIN_FAULT), kills it
    with SIGKILL there and returns the time of the kill."""
    deadline = time.monotonic() + 240
    out = ""
    while f"fault point {point} reached" not in out:
        assert proc.poll() is None and time.monotonic() < deadline, out[-3000:]
        out += proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    return time.monotonic()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted two-process run of 10 steps (checkpoints at 5 and 10); (workdir, outputs)."""
    mp = tmp_path_factory.mktemp("mp")
    return mp, finish(launch_two(mp))


@pytest.mark.slow
def test_two_process_onn_train_matches_one_process(two_process_run, tmp_path):
    mp, outs = two_process_run
    ref = tmp_path / "ref"
    finish([launch(ref, 4, {})])
    assert "trained steps 0 -> 10" in outs[0] and "trained steps" not in outs[1]  # one process reports
    got, want = rows(mp), rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 5, 10]  # no row lost or doubled
    for g, w in zip(got, want):
        for key in ("train/main_loss", "moe/avg_k", "eval/main_loss", "eval/avg_k"):
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-4, err_msg=f"step {g['step']} {key}")
        if "eval/tokens" in w:  # the eval saw the rows of both processes
            assert g["eval/tokens"] == w["eval/tokens"]
    assert sorted(p.name for p in (mp / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
    assert (mp / "config.json").exists() and (mp / "plots" / "loss.png").exists()


@pytest.mark.slow
def test_a_killed_process_stops_the_survivor_and_both_resume_exactly(two_process_run, tmp_path):
    """Issue 26.6: process 1 killed -9 after step 7 (process 0 waits for it in step 8's collectives):
    process 0 stops within heartbeat_timeout_s, before jax's runtime would abort it, with one line
    naming the lost process and checkpoint step 5 (left intact); rerunning both processes resumes
    from it and ends with the uninterrupted run's parameters, bit for bit."""
    from test_faults import assert_bitwise_equal, final_params

    from onn_jax.io.workdir import LOCK_FILE
    w = tmp_path / "w"
    procs = launch_two(w, faults=("", "after_step:7"))
    killed = kill_at_fault(procs[1], "after_step:7")
    out0 = procs[0].communicate(timeout=120)[0]
    stopped_after = time.monotonic() - killed
    procs[1].wait()
    assert procs[0].returncode == 5, out0[-3000:]
    assert stopped_after < HEARTBEAT_S, stopped_after  # the watchdog (at half of it) came first
    assert own_lines(out0) == [
        f"onn-train: process 1 of 2 is lost (no heartbeat for {HEARTBEAT_S / 2:g} s: killed, crashed, or its "
        "host is down); process 0 stops too (exit code 5). Restart all 2 processes with the same command: "
        f"they resume from the last committed checkpoint, step 5 in {w / 'checkpoints'}"], out0[-3000:]
    assert "Traceback" not in out0 and "Check failure" not in out0
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["5"] and not (w / LOCK_FILE).exists()
    outs = finish(launch_two(w))
    assert "resuming from step 5" in outs[0]
    assert_bitwise_equal(final_params(w, 10), final_params(two_process_run[0], 10))
    assert [r["step"] for r in rows(w)] == [r["step"] for r in rows(two_process_run[0])] == [1, 5, 10]


@pytest.mark.slow
def test_a_process_lost_before_the_first_step_undoes_the_start(tmp_path):
    """Issue 26.4 and 26.6 together: process 1 killed -9 after its set-up, before the first step;
    process 0 stops with the one line and exit code 5 and leaves nothing of the new workdir (the
    folder itself stays only where process 1's mkdir came first: the start did not create it)."""
    w = tmp_path / "w"
    procs = launch_two(w, faults=("", "in_start:0"))
    kill_at_fault(procs[1], "in_start:0")
    out0 = procs[0].communicate(timeout=120)[0]
    procs[1].wait()
    assert procs[0].returncode == 5, out0[-3000:]
    assert own_lines(out0) == [
        f"onn-train: process 1 of 2 is lost (no heartbeat for {HEARTBEAT_S / 2:g} s: killed, crashed, or its "
        "host is down); process 0 stops too (exit code 5). Restart all 2 processes with the same command: "
        f"no checkpoint is committed in {w / 'checkpoints'} yet: they start again"], out0[-3000:]
    assert not w.exists() or list(w.iterdir()) == [], sorted(p.name for p in w.iterdir())


@pytest.mark.slow
def test_a_mesh_that_leaves_devices_out_names_the_fix(tmp_path):
    """Issue 26.7: configs/tiny.py's mesh.data=1 under a 2-process launch: one line in each process
    saying what to pass, exit 2 in both, no workdir left."""
    outs = finish(launch_two(tmp_path / "w", args=[a for a in ARGS if not a.startswith("--config.mesh")]),
                  codes=(2,))
    for out in outs:
        assert own_lines(out) == [
            "onn-train: error: mesh: data*expert*fsdp = 1*1*1 = 1 devices, but this run of 2 processes has 4 "
            "(2 per process) and the mesh must hold them all (each process feeds the batch rows of its own "
            "devices); pass --config.mesh.data=-1 (all devices), or sizes whose product is 4"], out[-3000:]
    assert not (tmp_path / "w").exists()


def test_an_unreachable_coordinator_is_one_line(capsys, tmp_path, monkeypatch):
    """Issue 26.6: process 1 of a launch whose coordinator nobody runs: one line naming the
    address within distributed.initialization_timeout_s, exit 2, nothing written (in-process:
    the coordinator's port is probed before jax.distributed is touched)."""
    from train.main import main
    with socket.socket() as held:  # a port of ours that no one listens on
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        for name, value in zip(LAUNCH, (address, "2", "1")):
            monkeypatch.setenv(name, value)
        t0 = time.monotonic()
        code = main(["--workdir", str(tmp_path / "w"), *ARGS, "--config.distributed.initialization_timeout_s=2"])
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"onn-train: distributed launch error: cannot reach the coordinator at {address} "
                                 "within distributed.initialization_timeout_s = 2 s (Connection refused); start "
                                 "process 0 there, or fix JAX_COORDINATOR_ADDRESS"], err
    assert 2 <= took < 10 and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_processes_that_never_join_are_one_line(tmp_path):
    """Issue 26.6: process 0 of 2 alone: one line within the initialization timeout, exit 2 (not
    jax's abort a few seconds later)."""
    port = free_port()
    t0 = time.monotonic()
    out = finish([launch(tmp_path / "w", 2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                             "JAX_PROCESS_ID": "0"},
                         [*ARGS, "--config.distributed.initialization_timeout_s=3"])], codes=(2,))[0]
    assert time.monotonic() - t0 < 30
    assert own_lines(out) == [
        f"onn-train: distributed launch error: not all 2 processes joined the coordinator at 127.0.0.1:{port} within "
        "distributed.initialization_timeout_s = 3 s (this is process 0); start every process with the same "
        "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES"], out
    assert "Check failure" not in out and not (tmp_path / "w").exists()
