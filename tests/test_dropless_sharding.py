"""The dropless step on 8 forced CPU devices equals the one-device step: data parallel (8,1),
which runs the layer per device in onn_jax.dispatch.expert_parallel's shard_map with ep = 1 (its custom
kernels cannot be partitioned by XLA). ep_budget = E: no device's buffer overflows, so the
global pair budget alone drops pairs, as on one device. Expert meshes ((4,2), (2,4), (1,8))
and the per-device overflow rule are tests/test_expert_parallel.py's."""
import dataclasses
import functools

import jax
import numpy as np
import pytest
from test_sharding import CFG, TX, assert_tree_close, make_batch, mesh_of

from onn_jax.training.sharded import make_sharded_train_step, shard_batch, state_shardings
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step
from tests.helpers import needs_devices

pytestmark = needs_devices(8)

DL = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, dispatch="dropless", pair_budget=3.0,
                                                     gemm="padded", ep_budget=float(CFG.moe.num_experts)))


@pytest.fixture(scope="module")
def reference():
    state0 = jax.jit(functools.partial(init_state, DL, TX))(jax.random.key(0))
    state1, metrics = make_train_step(DL, TX, donate=False)(state0, make_batch())
    return jax.device_get((state0, state1, metrics))


@pytest.mark.slow
@pytest.mark.parametrize("shape,gemm", [((8, 1, 1), "ragged_dot")])
def test_sharded_dropless_step_equals_one_device(shape, gemm, reference):
    """The padded and ragged_dot backends give the same one-device step (test_dropless), so
    the padded reference stands for both."""
    state0_ref, state1_ref, metrics_ref = reference
    assert 0 < float(metrics_ref["moe/dropped_frac"]) < 1  # the budget binds: drops must agree too
    mesh = mesh_of(shape)
    cfg = dataclasses.replace(DL, moe=dataclasses.replace(DL.moe, gemm=gemm))
    state = jax.device_put(state0_ref, state_shardings(state0_ref, mesh))
    new_state, metrics = make_sharded_train_step(cfg, TX, mesh)(state, shard_batch(make_batch(), mesh))
    for key in ("train/main_loss", "moe/gate_loss", "moe/avg_k", "moe/dropped_frac", "train/grad_norm"):
        np.testing.assert_allclose(metrics[key], metrics_ref[key], rtol=1e-5, err_msg=key)
    assert_tree_close(new_state, state1_ref)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)], ids=["8x1", "2x4"])
def test_mesh_eval_equals_one_device_eval(shape, reference):
    """onn-train's eval on a mesh (make_eval_step(mesh=...), global batches) runs the dropless
    layer per device as training does and gives the one-device eval's metrics."""
    from train.run.evaluate import evaluate, make_eval_step
    state0_ref = reference[0]
    batch = {**make_batch(seed=3), "domain": np.arange(len(make_batch()["inputs"])) % 2}
    batch["domain"][-1] = -1                      # a padding row
    want = evaluate(make_eval_step(DL, 2), state0_ref.params, [batch])
    mesh = mesh_of(shape)
    params = jax.device_put(state0_ref.params, state_shardings(state0_ref, mesh).params)
    step = make_eval_step(DL, 2, mesh=mesh)
    got = evaluate(step, params, [batch], place=lambda b: shard_batch(b, mesh))
    assert set(got) == set(want)
    if shape[1] > 1:  # the expert-parallel layer (its all-to-all), not XLA's partitioning of it
        assert "all_to_all" in step.lower(params, shard_batch(batch, mesh)).as_text()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
