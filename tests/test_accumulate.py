"""Gradient accumulation: k = 1, 2, 4 microbatches give the one-batch step (float32, 1e-5),
with uneven label counts across microbatches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import OptimConfig
from onn_jax.training.accumulate import NOT_BATCH_VALUES, split_microbatches
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, make_train_step


def uneven_batch(seed=0, b=8, t=8):
    """Rows with very different label counts (0 .. t), so microbatches differ in their share."""
    batch = random_batch(seed, batch=b, length=t, mask_prompt=False)
    counts = np.array([0, 8, 1, 7, 3, 8, 2, 5])[:b]
    mask = (np.arange(t)[None, :] >= (t - counts)[:, None]).astype(np.float32)
    return {**batch, "loss_mask": jnp.asarray(mask)}


def test_split_is_strided_and_covers_every_row():
    x = jnp.arange(8)[:, None] * jnp.ones((8, 3), jnp.int32)
    m = split_microbatches({"x": x}, 4)["x"]
    assert m.shape == (4, 2, 3)
    np.testing.assert_array_equal(m[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="accum_steps"):
        split_microbatches({"x": x}, 3)


def one_step(cfg, tx, k):
    """Jitted (grads, metrics, updated params) of the step from k microbatches (k=0: one batch)."""
    import optax

    from onn_jax.training.accumulate import accumulated_grads

    def fn(state, batch):
        grads, metrics = (compute_grads(state.params, batch, cfg) if k == 0
                          else accumulated_grads(compute_grads, state.params, batch, cfg, k))
        active = metrics.get("moe/expert_active")  # as train_step hands it to the optimizer
        updates, _ = tx.update(grads, state.opt_state, state.params, expert_active=active)
        return grads, metrics, optax.apply_updates(state.params, updates)
    return jax.jit(fn)


@pytest.mark.parametrize("moe_kwargs,ks", [(dict(), (1, 2, 4)),
                                           (dict(gate_tokens="unmasked", dispatch="sparse"), (2,))])
def test_accumulated_step_equals_one_batch_step(moe_kwargs, ks):
    cfg = tiny_config(**moe_kwargs)
    batch = uneven_batch()
    labels = batch["loss_mask"].reshape(4, 2, -1).swapaxes(0, 1).sum((1, 2))
    assert len(set(np.asarray(labels).tolist())) > 1  # microbatches (k=2) differ in label count
    tx = make_optimizer(OptimConfig())
    state0 = init_state(cfg, tx, jax.random.key(0))
    ref_grads, ref_metrics, ref_params = one_step(cfg, tx, 0)(state0, batch)
    for k in ks:
        grads, metrics, params = one_step(cfg, tx, k)(state0, batch)
        assert rel_err(grads, ref_grads) < 1e-5, k
        for leaf, ref_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert rel_err(leaf, ref_leaf) < 1e-4, k  # every leaf, not only the largest
        assert rel_err(params, ref_params) < 1e-5, k
        for key, ref in ref_metrics.items():
            if key in NOT_BATCH_VALUES:
                continue
            np.testing.assert_allclose(np.asarray(metrics[key], np.float64), np.asarray(ref, np.float64),
                                       rtol=1e-5, atol=1e-7,
                                       err_msg=f"{key} k={k}")


def test_train_step_accum_steps_runs_the_accumulated_gradient():
    """make_train_step(accum_steps=2) is the one-batch step too (the wiring, not only the math)."""
    cfg = tiny_config(num_layers=1)
    tx = make_optimizer(OptimConfig())
    state0 = init_state(cfg, tx, jax.random.key(1))
    batch = uneven_batch(1)
    ref, _ = make_train_step(cfg, tx, donate=False)(state0, batch)
    new, metrics = make_train_step(cfg, tx, donate=False, accum_steps=2)(state0, batch)
    assert rel_err(new.params, ref.params) < 1e-5


def test_wrong_shares_are_detected():
    """Unscaled microbatch losses (a plain mean of microbatch gradients) differ: the test can fail."""
    cfg = tiny_config()
    batch = uneven_batch()
    params = init_state(cfg, make_optimizer(OptimConfig()), jax.random.key(0)).params
    grads = jax.jit(lambda b: compute_grads(params, b, cfg)[0])  # compiled: eager is minutes on CPU
    ref = grads(batch)
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    naive = jax.tree.map(lambda a, b: (a + b) / 2, *[grads(h) for h in halves])
    assert rel_err(naive, ref) > 1e-2
