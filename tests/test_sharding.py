"""Sharded init and train step on 8 forced CPU devices equal the 1-device computation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onn_jax.config import ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig
from onn_jax.parallel.constrain import activation_rules, constrain
from onn_jax.parallel.mesh import make_mesh
from onn_jax.parallel.rules import LOGICAL_AXES, batch_sharding, logical_axes_tree
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import abstract_state, make_sharded_train_step, shard_batch, sharded_init, state_shardings
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, make_train_step
from tests.helpers import needs_devices

CFG = ModelConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=2, max_len=16,
                  moe=MoEConfig(num_experts=8, intermediate=16))
TX = make_optimizer(OptimConfig())
B, T = 8, 8
MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]


def make_batch(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (batch, T + 1)).astype(np.int32)
    mask = (rng.random((batch, T)) > 0.2).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def mesh_of(shape):
    data, expert, fsdp = shape
    return make_mesh(MeshConfig(data=data, expert=expert, fsdp=fsdp))


@pytest.fixture(scope="module")
def reference():
    """One step on one device (no shardings): initial state, grads, new state, metrics."""
    state0 = jax.jit(functools.partial(init_state, CFG, TX))(jax.random.key(0))
    batch = make_batch()
    grads, _ = jax.jit(functools.partial(compute_grads, cfg=CFG))(state0.params, batch)
    state1, metrics = make_train_step(CFG, TX, donate=False)(state0, batch)
    return jax.device_get((state0, grads, state1, metrics))


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def first_moment(state):
    """AdamW's mu after one step from zero: (1 - b1) * the (filtered) gradient."""
    adam = state.opt_state[1]  # the per-expert AdamW state (optax.adamw's is a chain: [1][0])
    return adam.mu if hasattr(adam, "mu") else adam[0].mu


def test_first_moment_is_the_gradient(reference):
    """Pins the gradient proxy used below: after step 1, mu = 0.1 * grad off the expert filter."""
    _, grads, state1, _ = reference
    mu = first_moment(state1)
    for (path, m), g in zip(jax.tree_util.tree_leaves_with_path(mu), jax.tree.leaves(grads)):
        if "experts" in jax.tree_util.keystr(path):
            kept = m != 0  # the 2-sigma filter zeroes some expert entries
            assert 0 < kept.mean() < 1
            np.testing.assert_allclose(m[kept], 0.1 * g[kept], rtol=1e-5, atol=1e-9)
        else:
            np.testing.assert_allclose(m, 0.1 * g, rtol=1e-5, atol=1e-9, err_msg=jax.tree_util.keystr(path))


MESH_PARAMS = [pytest.param(s, id="x".join(map(str, s)),
                            marks=() if s in ((8, 1, 1), (2, 4, 1)) else pytest.mark.slow)
               for s in MESHES]


@needs_devices(8)
@pytest.mark.parametrize("shape", MESH_PARAMS)
def test_sharded_step_equals_one_device(shape, reference):
    """Loss, gradients (via mu), updated params and optimizer state equal one device's."""
    state0_ref, _, state1_ref, metrics_ref = reference
    mesh = mesh_of(shape)
    shardings = state_shardings(state0_ref, mesh)
    state = jax.device_put(state0_ref, shardings)
    step = make_sharded_train_step(CFG, TX, mesh)
    new_state, metrics = step(state, shard_batch(make_batch(), mesh))
    assert state.params["embed"]["embedding"].is_deleted()  # donated
    for key in ("train/main_loss", "train/total_loss", "moe/gate_loss", "moe/avg_k", "moe/gate_acc",
                "train/grad_norm", "train/filtered_frac"):
        np.testing.assert_allclose(metrics[key], metrics_ref[key], rtol=1e-5, err_msg=key)
    assert_tree_close(first_moment(new_state), first_moment(state1_ref), atol=1e-9)
    assert_tree_close(new_state, state1_ref)
    # the new state keeps the layout, so the next step needs no resharding
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                            new_state, shardings)))


@needs_devices(8)
def test_sharded_init_and_expert_weight_specs(reference):
    mesh = mesh_of((2, 2, 2))
    state = sharded_init(CFG, TX, jax.random.key(0), mesh)
    assert_tree_close(state, reference[0], rtol=0, atol=0)  # same values as the 1-device init
    p = state.params
    assert p["block_0"]["moe"]["experts"]["w1"].sharding.spec == P("expert", "fsdp")
    assert p["block_0"]["moe"]["experts"]["w2"].sharding.spec == P("expert", None, "fsdp")
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp")
    assert p["block_0"]["norm_moe"]["ln"]["scale"].sharding.spec == P()
    assert first_moment(state)["block_0"]["moe"]["experts"]["w1"].sharding.spec == P("expert", "fsdp")
    # each device holds E/2 experts and C/2 of the hidden rows
    assert {s.data.shape for s in p["block_0"]["moe"]["experts"]["w1"].addressable_shards} == {(4, 8, 16)}

    moe = abstract_state(CFG, TX, mesh_of((2, 4, 1))).params["block_0"]["moe"]
    assert moe["experts"]["w1"].sharding.spec == P("expert")
    assert moe["experts"]["w2"].sharding.spec == P("expert")
    assert moe["prototypes"].sharding.spec == P(None, "expert")
    assert moe["thresholds"].sharding.spec == P("expert")
    assert batch_sharding(mesh).spec == P(("data", "expert", "fsdp"))
    assert batch_sharding(mesh_of((8, 1, 1))).spec == P("data")


def test_logical_axes_cover_every_parameter():
    for moe in (MoEConfig(num_experts=8, intermediate=16, expert_kind="swiglu"),
                MoEConfig(num_experts=8, intermediate=16, router="topk"),
                MoEConfig(num_experts=8, intermediate=16, router="dense")):
        cfg = ModelConfig(vocab_size=64, hidden=16, num_heads=2, norm="rmsnorm", final_norm=True, moe=moe)
        shapes = jax.eval_shape(functools.partial(init_state, cfg, TX), jax.random.key(0)).params
        axes = logical_axes_tree(shapes)
        for a, x in zip(jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple)), jax.tree.leaves(shapes)):
            assert len(a) == x.ndim and set(a) <= set(LOGICAL_AXES)
    with pytest.raises(ValueError, match="block_0/mystery"):
        logical_axes_tree({"block_0": {"mystery": jnp.zeros(3)}})


@needs_devices(8)
def test_make_mesh_resolves_and_rejects():
    assert dict(make_mesh(MeshConfig(data=-1, expert=2)).shape) == {"data": 4, "expert": 2, "fsdp": 1}
    assert dict(make_mesh(MeshConfig(data=2, expert=-1, fsdp=2)).shape) == {"data": 2, "expert": 2, "fsdp": 2}
    with pytest.raises(ConfigError, match="mesh: data\\*expert\\*fsdp = 2\\*2\\*1"):
        make_mesh(MeshConfig(data=2, expert=2))
    with pytest.raises(ConfigError, match="mesh.expert"):
        make_mesh(MeshConfig(data=1, expert=-1, fsdp=3))


@needs_devices(8)
def test_indivisible_experts_and_batch_are_config_errors():
    mesh = mesh_of((1, 8, 1))
    cfg = ModelConfig(vocab_size=64, hidden=16, num_heads=2, moe=MoEConfig(num_experts=4, intermediate=16))
    with pytest.raises(ConfigError, match="mesh.expert"):
        sharded_init(cfg, TX, jax.random.key(0), mesh)
    with pytest.raises(ConfigError, match="train.batch_size"):
        shard_batch(make_batch(batch=4), mesh)


@needs_devices(8)
def test_constrain_applies_only_inside_activation_rules():
    mesh = mesh_of((2, 4, 1))
    x = jnp.ones((8, 8, 4))
    assert constrain(x, ("moe_batch", "expert", "embed")) is x

    @jax.jit
    def f(x):
        with activation_rules(mesh):
            return constrain(x * 2, ("moe_batch", "expert", "embed"))

    y = f(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "expert")), 3)
    np.testing.assert_array_equal(y, 2 * x)


@needs_devices(8)
def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path, reference):
    ocp = pytest.importorskip("orbax.checkpoint")
    mesh_a, mesh_b = mesh_of((8, 1, 1)), mesh_of((2, 4, 1))
    trained = reference[2]  # after one step: non-zero optimizer moments
    state = jax.device_put(trained, state_shardings(trained, mesh_a))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", abstract_state(CFG, TX, mesh_b))
    assert_tree_close(restored, trained, rtol=0, atol=0)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                            restored, state_shardings(trained, mesh_b))))
    assert restored.params["block_0"]["moe"]["experts"]["w1"].sharding.spec == P("expert")
