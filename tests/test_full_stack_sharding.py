"""Phase-2 gated units (and the adaptive softmax output) on a mesh: the sharded step (and, for the
heads and slots, onn-train's mesh eval) equals one device's (test_sharding pattern)."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from onn_jax.config import EmbedConfig, HeadsConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig, OutputConfig
from onn_jax.parallel.mesh import make_mesh
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import make_sharded_train_step, shard_batch, sharded_init, state_shardings
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step
from tests.helpers import needs_devices

pytestmark = needs_devices(8)

BASE = ModelConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=4, max_len=16,
                   moe=MoEConfig(num_experts=8, intermediate=16))
TX = make_optimizer(OptimConfig())
CONFIGS = {
    "heads_and_slots": dataclasses.replace(BASE, heads=HeadsConfig(router="surprise", surprise="advantage"),
                                           embed=EmbedConfig(kind="slots", num_slots=16, code_dim=8)),
    "heads_topk": dataclasses.replace(BASE, heads=HeadsConfig(router="topk"),  # + adaptive softmax
                                      output=OutputConfig(kind="adaptive", cutoffs=(8, 24),
                                                          order=tuple(range(63, -1, -1)))),
}


def make_batch(seed=0, batch=8, length=8):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BASE.vocab_size, (batch, length + 1)).astype(np.int32)
    mask = (rng.random((batch, length)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_step_with_gated_units_equals_one_device(name):
    cfg = CONFIGS[name]
    state0 = jax.jit(functools.partial(init_state, cfg, TX))(jax.random.key(0))
    batch = make_batch()
    ref_state, ref_metrics = make_train_step(cfg, TX, donate=False)(state0, batch)
    ref_state, ref_metrics = jax.device_get((ref_state, ref_metrics))
    mesh = make_mesh(MeshConfig(data=2, expert=2, fsdp=2))
    state = sharded_init(cfg, TX, jax.random.key(0), mesh)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.device_get(state0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    new_state, metrics = make_sharded_train_step(cfg, TX, mesh)(state, shard_batch(batch, mesh))
    for key in sorted(k for k in ref_metrics if k.startswith(("attn/", "embed/", "train/main_loss", "train/total"))):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    attn = new_state.params["block_0"]["attn"]
    gate_key = "head_prototypes" if "head_prototypes" in attn else "head_router"
    assert attn[gate_key].sharding.spec == jax.sharding.PartitionSpec("fsdp")  # ('embed', 'heads')
    if "output" in new_state.params:  # adaptive softmax: ('embed', 'vocab'), ('embed', 'tail'), ('tail', 'vocab')
        out = new_state.params["output"]
        assert out["head"].sharding.spec == out["tail_1"]["proj"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
        assert out["tail_2"]["out"].sharding.spec == jax.sharding.PartitionSpec()
    if name == "heads_and_slots":  # onn-train's eval on the mesh: the same eval/attn_*, eval/embed_*
        from train.run.evaluate import evaluate, make_eval_step
        eval_batch = {**batch, "domain": np.arange(len(batch["inputs"])) % 2}
        want = evaluate(make_eval_step(cfg, 2), state0.params, [eval_batch])
        params = jax.device_put(state0.params, state_shardings(state0, mesh).params)  # `state` was donated
        got = evaluate(make_eval_step(cfg, 2, mesh=mesh), params, [eval_batch],
                       place=lambda b: shard_batch(b, mesh))
        assert set(got) == set(want) and {"eval/attn_head_load", "eval/embed_slot_load"} <= set(want)
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
