"""The no-token rule (optim.idle_experts='skip') against PyTorch's AdamW written out in NumPy.

In the original each expert is its own tensor and an expert that received no token has a
`None` gradient: it is left out of the pooled 2-sigma statistics and AdamW skips it (no
decay, no moments, its own step counter stays).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_batch, tiny_config

from onn_jax.config import OptimConfig
from onn_jax.core.gate import RouterOutput
from onn_jax.core.grad_filter import sigma_filter
from onn_jax.core.optimizer import PerExpertAdamState
from onn_jax.nn.moe import MoERecord, expert_received_tokens
from onn_jax.nn.transformer import Transformer
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step

L, E = 2, 4
# Which experts receive a token at each of four steps ([L, E]); the idle set changes.
ACTIVE = [np.ones((L, E), bool),
          np.array([[1, 0, 1, 1], [1, 1, 1, 0]], bool),
          np.array([[1, 0, 0, 1], [1, 1, 1, 1]], bool),
          np.ones((L, E), bool)]
HYPER = dict(b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
SCHEDULE = optax.linear_schedule(1e-2, 4e-3, 4)  # lr of the global update count 0, 1, 2, 3


def make_params(rng):
    block = lambda: {"moe": {"experts": {"w1": rng.normal(size=(E, 3, 2)), "w2": rng.normal(size=(E, 2, 3))},
                             "thresholds": rng.normal(size=(E,))}}
    return {"block_0": block(), "block_1": block(), "embed": rng.normal(size=(5, 3))}


def make_grads(rng, active_LxE, idle_value=0.0):
    """Gradients like the model's: an idle expert's slice is `idle_value` (0 in a real step)."""
    g = make_params(rng)
    for l in range(L):
        for w in g[f"block_{l}"]["moe"]["experts"].values():
            w[~active_LxE[l]] = idle_value
    return g


def torch_tensors(tree, active_LxE=None):
    """The original's tensors: one per expert slice of an expert leaf (None if idle), else one per leaf."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if "experts" in name:
            layer = int(name.split("block_")[1][0])
            for e in range(E):
                idle = active_LxE is not None and not active_LxE[layer, e]
                out[(name, e)] = None if idle else np.array(x[e], np.float64)
        else:
            out[(name, None)] = np.array(x, np.float64)
    return out


def torch_reference(params, grads_per_step, actives):
    """PyTorch AdamW (per-tensor step counters, None grads skipped) after the pooled 2-sigma filter."""
    p = torch_tensors(params)
    state = {k: {"step": 0, "m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in p.items()}
    b1, b2, eps, wd = HYPER["b1"], HYPER["b2"], HYPER["eps"], HYPER["wd"]
    for k, (grads, active) in enumerate(zip(grads_per_step, actives)):
        g = torch_tensors(grads, active)
        pooled = np.concatenate([v.ravel() for (n, e), v in g.items() if e is not None and v is not None])
        thr = pooled.mean() + 2 * pooled.std(ddof=1)
        lr = float(SCHEDULE(k))
        for key, grad in g.items():
            if grad is None:
                continue
            if key[1] is not None:
                grad = np.where(grad > thr, 0.0, grad)
            s = state[key]
            s["step"] += 1
            p[key] = p[key] * (1 - lr * wd)
            s["m"] = b1 * s["m"] + (1 - b1) * grad
            s["v"] = b2 * s["v"] + (1 - b2) * grad * grad
            denom = np.sqrt(s["v"]) / np.sqrt(1 - b2 ** s["step"]) + eps
            p[key] = p[key] - lr / (1 - b1 ** s["step"]) * s["m"] / denom
    return p, state


def adam_state(opt_state) -> PerExpertAdamState:
    return opt_state[1]


def test_per_expert_adamw_matches_pytorch_with_none_gradients():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    grads_per_step = [make_grads(rng, a) for a in ACTIVE]
    tx = make_optimizer(OptimConfig(b1=HYPER["b1"], weight_decay=HYPER["wd"]), learning_rate=SCHEDULE)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, expert_active=a))
    for grads, active in zip(grads_per_step, ACTIVE):
        u, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state, p, active)
        p = optax.apply_updates(p, u)
    ref_p, ref_state = torch_reference(params, grads_per_step, ACTIVE)
    got_p, got_adam = torch_tensors(jax.device_get(p)), adam_state(state)
    got_m, got_v = torch_tensors(jax.device_get(got_adam.mu)), torch_tensors(jax.device_get(got_adam.nu))
    counts = torch_tensors(jax.tree.map(lambda c: np.asarray(c), got_adam.counts))
    for key in ref_p:
        # every step moves an entry by about lr = 1e-2; float32 against float64
        np.testing.assert_allclose(got_p[key], ref_p[key], atol=2e-6, err_msg=str(key))
        np.testing.assert_allclose(got_m[key], ref_state[key]["m"], rtol=1e-5, atol=1e-7, err_msg=str(key))
        np.testing.assert_allclose(got_v[key], ref_state[key]["v"], rtol=1e-5, atol=1e-9, err_msg=str(key))
        assert int(np.ravel(counts[key])[0]) == ref_state[key]["step"], key
    assert int(got_adam.count) == 4  # the global counter drives the schedule
    # layer 0 expert 1 was idle twice, expert 2 once: counters 2 and 3 of 4
    np.testing.assert_array_equal(got_adam.counts["block_0"]["moe"]["experts"]["w1"], [4, 2, 3, 4])
    np.testing.assert_array_equal(got_adam.counts["embed"], 4)

    # The option `zero_grad` (today's behaviour) is measurably different: idle experts decay.
    tx0 = make_optimizer(OptimConfig(weight_decay=HYPER["wd"], idle_experts="zero_grad"), learning_rate=SCHEDULE)
    p0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    s0 = tx0.init(p0)
    for grads, active in zip(grads_per_step, ACTIVE):
        u, s0 = tx0.update(jax.tree.map(jnp.asarray, grads), s0, p0, expert_active=active)
        p0 = optax.apply_updates(p0, u)
    w1, w1_0 = p["block_0"]["moe"]["experts"]["w1"], p0["block_0"]["moe"]["experts"]["w1"]
    assert float(jnp.max(jnp.abs(w1[1] - w1_0[1]))) > 1e-4


def test_filter_statistics_exclude_idle_experts():
    """Idle experts' entries (even huge ones) do not enter mean, std or n."""
    rng = np.random.default_rng(1)
    active = ACTIVE[2]
    grads = make_grads(rng, active, idle_value=50.0)
    grads["block_0"]["moe"]["experts"]["w1"][0, 0, 0] = 6.0  # an outlier of an active expert
    tx = sigma_filter(idle_aware=True)
    out, st = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads), expert_active=active)
    g = torch_tensors(grads, active)
    pooled = np.concatenate([v.ravel() for (n, e), v in g.items() if e is not None and v is not None])
    thr = pooled.mean() + 2 * pooled.std(ddof=1)
    got = torch_tensors(jax.device_get(out), active)
    for key, v in g.items():
        if v is not None and key[1] is not None:
            np.testing.assert_array_equal(got[key], np.where(v > thr, 0.0, v).astype(np.float32), err_msg=str(key))
    np.testing.assert_allclose(float(st.zeroed_fraction), (pooled > thr).mean(), rtol=1e-6)
    # Without the mask the huge idle entries dominate the statistics: nothing active is cut.
    out_all, _ = sigma_filter().update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    cut = lambda t: sum(int(np.sum(v == 0)) for (n, e), v in torch_tensors(jax.device_get(t), active).items()
                        if e is not None and v is not None)
    assert cut(out_all) == 0 and cut(out) == int((pooled > thr).sum()) > 0


def test_expert_received_tokens_uses_the_computed_pairs():
    mask = jnp.array([[1, 0, 1], [1, 0, 0]], bool)
    router = RouterOutput(mask, mask, mask, mask.astype(jnp.float32))
    np.testing.assert_array_equal(expert_received_tokens(MoERecord(router, None)), [True, False, True])

    class Kept:  # a dispatch that dropped expert 2's only pair
        kept_NxE = jnp.array([[1, 0, 0], [1, 0, 0]], bool)
    np.testing.assert_array_equal(expert_received_tokens(MoERecord(router, None, Kept())), [True, False, False])


@pytest.fixture(scope="module")
def idle_run():
    """One faithful step on a 2-token batch, where some experts receive no token."""
    cfg = tiny_config(num_layers=2)
    tx = make_optimizer(OptimConfig())
    step = make_train_step(cfg, tx, donate=False)
    batch = random_batch(0, batch=1, length=2, mask_prompt=False)
    state0 = init_state(cfg, tx, jax.random.key(0))
    state1, metrics = step(state0, batch)
    return cfg, tx, step, batch, state0, state1, metrics


def test_idle_expert_is_bitwise_unchanged(idle_run):
    cfg, tx, step, batch, state0, state1, metrics = idle_run
    _, records = Transformer(cfg).apply(
        {"params": state0.params}, batch["inputs"], None)
    active = np.stack([np.asarray(jnp.any(r.router.mask, 0)) for r in records])
    assert (~active).sum() == metrics["moe/idle_experts"] > 0
    a0, a1 = adam_state(state0.opt_state), adam_state(state1.opt_state)
    for l in range(cfg.num_layers):
        for name in ("w1", "w2"):
            get = lambda tree: np.asarray(tree[f"block_{l}"]["moe"]["experts"][name])
            idle = ~active[l]
            for before, after in ((state0.params, state1.params), (a0.mu, a1.mu), (a0.nu, a1.nu)):
                assert get(before)[idle].tobytes() == get(after)[idle].tobytes()
            assert np.any(get(state0.params)[active[l]] != get(state1.params)[active[l]])
            np.testing.assert_array_equal(get(a1.counts), active[l].astype(np.int32))
    # a parameter that is exactly -0.0 stays -0.0 (the update of an idle expert is -0.0)
    params = jax.tree.map(lambda x: x, state0.params)
    l, e = np.argwhere(~active)[0]
    w1 = params[f"block_{l}"]["moe"]["experts"]["w1"]
    params[f"block_{l}"]["moe"]["experts"]["w1"] = w1.at[e, 0, 0].set(-0.0)
    s, _ = step(state0.replace(params=params), batch)
    assert np.signbit(np.asarray(s.params[f"block_{l}"]["moe"]["experts"]["w1"])[e, 0, 0])


def test_checkpoint_carries_the_per_expert_counters(idle_run, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from onn_jax.io.checkpointer import Checkpointer
    from onn_jax.io.restore_targets import abstract_like
    cfg, tx, step, batch, _, state1, _ = idle_run
    with Checkpointer(tmp_path / "ck", save_every=1) as ck:
        assert ck.save(1, state1, {"s": 1})
    uninterrupted, _ = step(state1, random_batch(3, batch=1, length=2, mask_prompt=False))
    ck = Checkpointer(tmp_path / "ck")
    restored, _ = ck.restore(abstract_like(init_state, cfg, tx, jax.random.key(5)))
    ck.close()
    counts = adam_state(restored.opt_state).counts["block_0"]["moe"]["experts"]["w1"]
    np.testing.assert_array_equal(counts, adam_state(state1.opt_state).counts["block_0"]["moe"]["experts"]["w1"])
    resumed, _ = step(restored, random_batch(3, batch=1, length=2, mask_prompt=False))
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
