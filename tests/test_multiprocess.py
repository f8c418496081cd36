"""Two processes on localhost (jax.distributed over CPU, 2 devices each) train like one process."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from cpu_flags import cpu_xla_flags

from onn_jax.config import ModelConfig, MoEConfig, OptimConfig
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, B, T = 3, 8, 8

WORKER = r'''
import json, sys
import numpy as np
from onn_jax.parallel.distributed import initialize_distributed, process_batch_rows, global_batch
assert initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jax.experimental import multihost_utils
from onn_jax.parallel.mesh import make_mesh
from onn_jax.parallel.rules import batch_sharding
from onn_jax.training.sharded import make_sharded_train_step, sharded_init
from onn_jax.config import MeshConfig
sys.path.insert(0, sys.argv[2])
from test_multiprocess import CFG, TX, batches

assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = make_mesh(MeshConfig(data=2, expert=2))
rows = process_batch_rows(mesh, %(B)d)
state = sharded_init(CFG, TX, jax.random.key(0), mesh)
step = make_sharded_train_step(CFG, TX, mesh)
losses = []
for batch in batches():
    local = {k: v[rows] for k, v in batch.items()}  # this process reads only its rows
    state, metrics = step(state, global_batch(local, mesh, %(B)d))
    losses.append(float(metrics["train/main_loss"]))
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(sys.argv[1] + "/params.npz", **leaves)
    json.dump({"losses": losses, "rows": [rows.start, rows.stop]}, open(sys.argv[1] + "/out.json", "w"))
''' % {"B": B}

CFG = ModelConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=2, max_len=16,
                  moe=MoEConfig(num_experts=8, intermediate=16))
TX = make_optimizer(OptimConfig())


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   XLA_FLAGS=cpu_xla_flags(2),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path),
                                       str(ROOT / "tests")], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["rows"] == [0, B // 2]  # process 0 held (and read) only the first half

    state = init_state(CFG, TX, jax.random.key(0))
    step = make_train_step(CFG, TX)
    losses = []
    for batch in batches():
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/main_loss"]))
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    got = np.load(tmp_path / "params.npz")
    expected = {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert sorted(got.files) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_single_process_is_left_alone(monkeypatch):
    from onn_jax.parallel import distributed
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") + distributed._CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize_distributed() is False
    assert distributed.initialize_distributed(num_processes=1) is False
    assert not jax.distributed.is_initialized()


def test_incomplete_launch_names_the_missing_variables(monkeypatch):
    from onn_jax.parallel import distributed
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") + distributed._CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"):
        distributed.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        distributed.initialize_distributed()


def test_process_batch_rows_single_process():
    from onn_jax.config import ConfigError, MeshConfig
    from onn_jax.parallel.distributed import global_batch, process_batch_rows
    from onn_jax.parallel.mesh import make_mesh
    from onn_jax.parallel.rules import batch_sharding
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    assert process_batch_rows(mesh, 16) == slice(0, 16)
    with pytest.raises(ConfigError, match="train.batch_size"):
        process_batch_rows(mesh, 12)
    x = np.arange(16 * 3).reshape(16, 3)
    arr = global_batch({"inputs": x}, mesh, 16)["inputs"]
    assert arr.sharding.is_equivalent_to(batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(arr), x)
