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


# ---------------------------------------------------------------- bounded failures (issue 26.6)

class FakeKV:
    """The coordination service's key-value store, as PeerWatchdog uses it (one per test)."""

    def __init__(self):
        import threading
        self.store, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.store
            self.store[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def watchdog(kv, me, n, stops):
    from onn_jax.parallel.distributed import PeerWatchdog
    return PeerWatchdog(1.0, lambda *verdict: stops.append(verdict), client=kv, process_id=me, num_processes=n)


def wait_for(cond, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_watchdog_names_a_silent_process_and_spares_a_finished_one():
    """Process 0 of 3: process 1 beats, process 2 finished (DONE), then process 1 falls silent:
    lost after heartbeat_timeout / 2, announced under EXIT_DIR for the others."""
    import time

    from onn_jax.parallel.distributed import DONE, EXIT_DIR, HEARTBEAT_DIR
    kv, stops = FakeKV(), []
    kv.key_value_set(HEARTBEAT_DIR + "2", DONE)
    dog = watchdog(kv, 0, 3, stops).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:  # process 1 alive for 1.5 s: three times lost_after
        last_beat = time.monotonic()
        kv.key_value_set(HEARTBEAT_DIR + "1", str(last_beat), allow_overwrite=True)
        time.sleep(0.05)
    assert stops == []
    assert wait_for(lambda: stops)
    # Measured from the last beat (not from a moment after it): never before lost_after (0.5 s),
    # and within lost_after + up to two intervals, with room for thread scheduling.
    assert 0.5 <= time.monotonic() - last_beat < 1.0
    assert stops == [("process 1 of 3 is lost (no heartbeat for 0.5 s: killed, crashed, or its host is down)",
                      (1,), None)]
    assert kv.store[EXIT_DIR + "0"] == "lost:1"
    dog.finish()


def test_watchdog_of_another_process_follows_the_announcements():
    from onn_jax.parallel.distributed import EXIT_DIR, exit_value, parse_exit
    assert parse_exit(exit_value(5, (2, 3))) == (5, (2, 3)) and parse_exit(exit_value(None, (1,))) == (None, (1,))
    kv, stops = FakeKV(), []
    watchdog(kv, 1, 3, stops).start()
    kv.key_value_set(EXIT_DIR + "2", "2")  # process 2 left with a bad-input error
    assert wait_for(lambda: stops)
    assert stops == [("process 2 of 3 stopped with exit code 2 (its own output says why)", (), 2)]
    kv2, stops2 = FakeKV(), []
    watchdog(kv2, 1, 3, stops2).start()
    kv2.key_value_set(EXIT_DIR + "0", "lost:2")  # process 0 found process 2 lost
    assert wait_for(lambda: stops2)
    assert stops2 == [("process 2 of 3 is lost (noticed by process 0)", (2,), None)]


def test_leave_waits_for_the_others_and_shuts_down_only_when_none_is_lost():
    import threading
    import time

    from onn_jax.parallel.distributed import DONE, EXIT_DIR, HEARTBEAT_DIR
    kv = FakeKV()
    dog = watchdog(kv, 0, 3, [])
    kv.key_value_set(HEARTBEAT_DIR + "2", DONE)  # finished: waits at the shutdown barrier
    t0 = time.monotonic()
    threading.Timer(0.2, kv.key_value_set, (EXIT_DIR + "1", "2")).start()
    # The timer starts after t0, so the lower bound holds; True only when every process arrived.
    assert dog.leave(2) is True and 0.2 <= time.monotonic() - t0 < 0.5  # everyone there: shut down together
    assert kv.store[EXIT_DIR + "0"] == "2"
    kv = FakeKV()
    t0 = time.monotonic()
    assert watchdog(kv, 0, 3, []).leave(5, lost=(1,), timeout=0.3) is False  # process 2 never answers
    assert 0.3 <= time.monotonic() - t0 < 1.0 and kv.store[EXIT_DIR + "0"] == "5 lost:1"


def test_runtime_timeouts_pass_what_the_installed_jax_takes():
    import inspect

    from onn_jax.config.run import DistributedConfig
    from onn_jax.parallel.distributed import INIT_MARGIN_S, runtime_timeouts
    cfg = DistributedConfig(initialization_timeout_s=30, heartbeat_timeout_s=12, shutdown_timeout_s=40)
    here = runtime_timeouts(cfg)
    assert set(here) <= set(inspect.signature(jax.distributed.initialize).parameters)
    assert here.get("initialization_timeout") == 30 + INIT_MARGIN_S  # jax 0.10.2 and 0.11 have it
    names = ["initialization_timeout", "heartbeat_timeout_seconds", "shutdown_timeout_seconds"]  # jax 0.10.2
    assert runtime_timeouts(cfg, names) == dict(zip(names, [30 + INIT_MARGIN_S, 12, 40]))
    assert runtime_timeouts(cfg, ["heartbeat_timeout", "coordinator_address"]) == {"heartbeat_timeout": 12}
