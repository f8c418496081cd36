"""The unified step against a naive two-pass computation and a hand-written AdamW update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import OptimConfig
from onn_jax.core.grad_filter import is_expert_path
from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss
from onn_jax.core.optimizer import PerExpertAdamState
from onn_jax.nn.transformer import Transformer, init_params, model_taps
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, make_train_step


def naive_grads(cfg, params, batch, surprise_from="main"):
    """Two independent passes: grad of the main loss, plus w_aux * grad of the gate losses
    with S computed separately (jax.grad w.r.t. the taps) and held constant."""
    model = Transformer(cfg)
    b, t = batch["inputs"].shape
    taps = model_taps(cfg, b, t)

    def main_loss(p, taps=taps):
        logits, _ = model.apply({"params": p}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    def gate_loss(p, surprises):
        _, records = model.apply({"params": p}, batch["inputs"], taps)
        m = cfg.moe
        total = 0.0
        for r, s in zip(records, surprises):
            if m.router == "surprise":
                total += hybrid_gate_loss(r.router.pre, s, m.w_ce, m.w_kl)[0]
            else:
                total += m.lb_weight * load_balancing_loss(r.router.logits, r.router.mask)
        return total

    def gate_loss_with_taps(tp, surprises):
        _, records = model.apply({"params": params}, batch["inputs"], tp)
        return sum(hybrid_gate_loss(r.router.pre, s, 1.0, 1.0)[0] for r, s in zip(records, surprises))

    if cfg.moe.router == "surprise":
        if surprise_from == "main":
            d_taps = jax.grad(lambda tp: main_loss(params, tp))(taps)
        else:  # the wrong rule, used to show the test can tell: S from main + all gate losses
            s0 = [jnp.zeros(tp.expert_out.shape[:2]) for tp in taps]
            d_taps = jax.grad(lambda tp: main_loss(params, tp) + gate_loss_with_taps(tp, s0))(taps)
        surprises = [jnp.linalg.norm(d.expert_out, axis=-1) for d in d_taps]
    else:
        surprises = [None] * cfg.num_layers

    g_main = jax.grad(main_loss)(params)
    if cfg.moe.router == "dense":
        return g_main
    g_gate = jax.grad(gate_loss)(params, [jax.lax.stop_gradient(s) if s is not None else None
                                          for s in surprises])
    return jax.tree.map(lambda a, b: a + cfg.moe.w_aux * b, g_main, g_gate)


def jitted(fn, cfg, params, batch, **kw):
    """fn(cfg, params, batch) as one compiled program: the same math, without the op-by-op
    dispatch of an eager transformer (minutes on CPU)."""
    return jax.jit(lambda p: fn(cfg, p, batch, **kw))(params)


@pytest.mark.parametrize("num_layers,moe_kwargs", [
    (2, {}),
    (3, {"w_ce": 0.7, "w_kl": 1.9, "w_aux": 0.5, "fallback_k": 3}),
    (2, {"expert_kind": "swiglu"}),
])
def test_unified_gradient_equals_naive_two_pass(num_layers, moe_kwargs):
    cfg = tiny_config(num_layers=num_layers, **moe_kwargs)
    params = init_params(cfg, jax.random.key(7))
    batch = random_batch(3)
    grads, metrics = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    expected = jitted(naive_grads, cfg, params, batch)
    err = rel_err(grads, expected)
    assert err < 1e-5, err
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
    # The gate loss reaches everything upstream: embedding and attention get its gradient.
    main_only = jax.grad(lambda p: next_token_loss(Transformer(cfg).apply({"params": p}, batch["inputs"])[0],
                                                   batch["targets"], batch["loss_mask"])[0])(params)
    assert rel_err(grads["embed"], main_only["embed"]) > 1e-3
    assert rel_err(grads["block_0"]["attn"], main_only["block_0"]["attn"]) > 1e-3


def test_surprise_comes_from_the_main_loss_alone():
    """Taking S from main + other layers' gate losses gives a measurably different gradient."""
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.key(8))
    batch = random_batch(4)
    grads, _ = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    right = jitted(naive_grads, cfg, params, batch, surprise_from="main")
    wrong = jitted(naive_grads, cfg, params, batch, surprise_from="total")
    assert rel_err(grads, right) < 1e-5
    lower_gate = lambda g: (g["block_0"]["moe"]["prototypes"], g["block_0"]["moe"]["thresholds"])
    assert rel_err(lower_gate(grads), lower_gate(right)) < 1e-5
    assert rel_err(lower_gate(wrong), lower_gate(right)) > 1e-4  # 10x the tolerance above


@pytest.mark.parametrize("router", ["topk", "dense"])
def test_baseline_routers_gradients(router):
    cfg = tiny_config(num_layers=2, router=router)
    params = init_params(cfg, jax.random.key(9))
    batch = random_batch(5)
    grads, metrics = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    assert rel_err(grads, jitted(naive_grads, cfg, params, batch)) < 1e-5
    assert ("moe/gate_lb" in metrics) == (router == "topk")


def torch_adamw_step(p, g, m, v, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    """PyTorch's AdamW update, written out (decoupled weight decay, bias-corrected moments)."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** step) + eps
    return p - lr / (1 - b1 ** step) * m / denom, m, v


def filtered(grads):
    """The faithful filter written out: pooled expert gradients, unbiased std, one-sided."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, grads))
    expert = np.concatenate([g.ravel() for path, g in flat if is_expert_path(path)])
    thr = expert.mean() + 2 * expert.std(ddof=1)
    out = [np.where(g > thr, 0.0, g) if is_expert_path(path) else g for path, g in flat]
    zeroed = sum(int((g > thr).sum()) for path, g in flat if is_expert_path(path))
    return jax.tree_util.tree_unflatten(treedef, out), zeroed / expert.size


def adamw_reference(params0, grads_per_step, **hyper):
    """PyTorch AdamW over several steps, in float64 NumPy."""
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params0)
    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    leaves, treedef = jax.tree.flatten(params)
    m, v = jax.tree.leaves(m), jax.tree.leaves(v)
    for step, grads in enumerate(grads_per_step, start=1):
        out = [torch_adamw_step(p, g, m_, v_, step, **hyper)
               for p, g, m_, v_ in zip(leaves, jax.tree.leaves(grads), m, v)]
        leaves, m, v = [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    return tuple(jax.tree.unflatten(treedef, x) for x in (leaves, m, v))


def test_train_step_is_filter_then_adamw_on_the_unified_gradient():
    """Two steps against PyTorch's AdamW written out (two, so that b1, b2 and the bias
    corrections all matter), on the filtered unified gradient."""
    cfg = tiny_config(num_layers=2)
    tx = make_optimizer(OptimConfig())
    state = init_state(cfg, tx, jax.random.key(10))
    params0 = state.params
    step = make_train_step(cfg, tx, donate=False)
    grads_per_step = []
    for batch in (random_batch(6), random_batch(16)):
        g, frac = filtered(jitted(naive_grads, cfg, state.params, batch))
        assert frac > 0
        grads_per_step.append(g)
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["train/filtered_frac"], frac, rtol=1e-6)
    assert int(state.step) == 2
    max_diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - y))), a, b)))
    params, mu, nu = adamw_reference(params0, grads_per_step)
    # Each step moves an entry by about lr = 1e-3; compare to 0.1% of that (entries whose
    # gradient is near eps are sensitive to float32 rounding of the gradient itself).
    assert max_diff(state.params, params) < 2e-6
    # The moments pin b1 and b2 (the parameters alone barely depend on b2 after two steps).
    kinds = (optax.ScaleByAdamState, PerExpertAdamState)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, kinds))
            if isinstance(s, kinds)][0]
    assert isinstance(adam, PerExpertAdamState)  # faithful default: per-expert step counters
    rel = lambda a, b: max_diff(a, b) / max(jax.tree.leaves(jax.tree.map(lambda y: float(np.max(np.abs(y))), b)))
    assert rel(adam.mu, mu) < 1e-4 and rel(adam.nu, nu) < 1e-4
    assert rel(adam.nu, adamw_reference(params0, grads_per_step, b2=0.99)[2]) > 1e-2
    assert rel(adam.mu, adamw_reference(params0, grads_per_step, b1=0.8)[1]) > 1e-2


def test_advantage_surprise_is_refused_with_sparse_dispatch():
    cfg = tiny_config(num_layers=1, dispatch="sparse")
    params = init_params(cfg, jax.random.key(12))
    with pytest.raises(ValueError, match="advantage"):
        compute_grads(params, random_batch(8), cfg, surprise_fn="advantage")


def test_metrics_are_consistent():
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.key(11))
    batch = random_batch(7)
    _, m = compute_grads(params, batch, cfg)
    _, records = Transformer(cfg).apply({"params": params}, batch["inputs"], None)
    avg_k = np.mean([np.asarray(r.router.mask).sum(-1).mean() for r in records])
    np.testing.assert_allclose(m["moe/avg_k"], avg_k, rtol=1e-6)
    assert m["moe/expert_load"].shape == (2, 8)
    np.testing.assert_allclose(np.asarray(m["moe/expert_load"]).sum(-1),
                               [np.asarray(r.router.mask).sum(-1).mean() for r in records], rtol=1e-6)
    np.testing.assert_allclose(m["moe/threshold_mean"], 0.5)  # theta initialised to 0
    np.testing.assert_allclose(m["train/total_loss"], m["train/main_loss"] + m["moe/gate_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["moe/gate_loss"], m["moe/gate_ce"] + m["moe/gate_kl"], rtol=1e-6)
    assert 0.0 <= float(m["moe/gate_acc"]) <= 1.0
    assert float(m["train/loss_tokens"]) == float(batch["loss_mask"].sum())
