"""onn-train launched as two processes on localhost (jax.distributed over CPU) equals one
process on as many devices; only process 0 writes the workdir's logs, and eval adds up the
rows of both processes."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from cpu_flags import cpu_xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tiny.py", "--config.mesh.data=4", "--config.train.steps=10",
        "--config.train.log_every=5", "--config.train.eval_every=5", "--config.checkpoint.every=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, devices, env_extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=cpu_xla_flags(devices), **env_extra)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if name not in env_extra:
            env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "train.main", *ARGS, "--workdir", str(workdir)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=300):
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_onn_train_matches_one_process(tmp_path):
    ref, mp = tmp_path / "ref", tmp_path / "mp"
    port = free_port()
    procs = [launch(mp, 2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                            "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = finish(procs)
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
