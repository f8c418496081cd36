"""Issue-16 baselines: aux-loss-free balancing, the shared expert, DynMoE's adaptive expert count
(router state in the train state and the checkpoint), and the gate-loss variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import ConfigError, MoEConfig, OptimConfig
from onn_jax.core import gate_targets as gt
from onn_jax.core.experts import dense_ffn
from onn_jax.core.gate import top_any_gate, topk_gate
from onn_jax.core.losses import hybrid_gate_loss
from onn_jax.nn.transformer import Transformer
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.options import adaptive_experts as ae
from onn_jax.training.options.aux_free import aux_free_bias
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step
from tests.helpers import random_batch, tiny_config

TX = make_optimizer(OptimConfig(lr=3e-3))


def unit(v):
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- aux-loss-free

def test_topk_bias_selects_but_does_not_weight():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    bias = np.array([0.0, 5.0, 0.0, -5.0, 0.0], np.float32)
    out = topk_gate(jnp.asarray(x), jnp.asarray(w), 2, jnp.asarray(bias))
    logits = x @ w
    for t in range(6):
        chosen = set(np.argsort(-(logits[t] + bias))[:2])
        assert set(np.flatnonzero(np.asarray(out.mask[t]))) == chosen
        assert 1 in chosen and 3 not in chosen
        idx = sorted(chosen)
        ref = np.exp(logits[t, idx] - logits[t, idx].max())
        np.testing.assert_allclose(np.asarray(out.weights[t, idx]), ref / ref.sum(), rtol=1e-5)


def test_aux_free_bias_rule():
    mask = jnp.asarray([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], bool)  # loads 3, 2, 1, 0; mean 1.5
    np.testing.assert_allclose(np.asarray(aux_free_bias(jnp.zeros(4), mask, 0.1)), [-0.1, -0.1, 0.1, 0.1])


def test_aux_free_train_step_updates_bias_outside_the_optimizer():
    cfg = tiny_config(router="topk", aux_free_rate=0.01)
    st0 = init_state(cfg, TX, jax.random.key(0))
    st1, m = make_train_step(cfg, TX, donate=False)(st0, random_batch(0))
    n = random_batch(0)["inputs"].size
    for i in range(cfg.num_layers):
        load = np.asarray(m["moe/expert_load"][i]) * n
        want = 0.01 * np.sign(load.mean() - load)
        np.testing.assert_allclose(np.asarray(st1.router_state[f"block_{i}"]["router_bias"]), want, atol=1e-7)
    assert "router_bias" not in st1.params["block_0"]["moe"]  # not a parameter: AdamW never sees it
    assert "router_bias" in st1.model_params["block_0"]["moe"]
    with pytest.raises(ValueError, match="model_params"):
        Transformer(cfg).apply({"params": st1.params}, random_batch(0)["inputs"])


# ----------------------------------------------------------------------------- shared expert

def test_shared_expert_adds_an_always_on_ffn():
    cfg = tiny_config(num_layers=1, shared_expert=True)
    base = tiny_config(num_layers=1)
    params = init_state(cfg, TX, jax.random.key(1)).params
    moe = params["block_0"]["moe"]
    assert moe["shared_w1"].shape == (16, 16) and moe["shared_w2"].shape == (16, 16)
    toks = random_batch(0)["inputs"]
    without = {**params, "block_0": {**params["block_0"], "moe": {k: v for k, v in moe.items()
                                                                  if not k.startswith("shared_")}}}
    # The difference of the two models' logits comes only from the shared FFN: check the layer.
    from onn_jax.nn.layers import MoEFeedForward
    x = jax.random.normal(jax.random.key(2), (2, 8, 16))
    y_with, _ = MoEFeedForward(cfg).apply({"params": moe}, x)
    y_base, _ = MoEFeedForward(base).apply({"params": without["block_0"]["moe"]}, x)
    shared = {"w1": moe["shared_w1"], "w2": moe["shared_w2"]}
    ref = y_base + dense_ffn(shared, x.reshape(16, 16), "gelu").reshape(2, 8, 16)
    np.testing.assert_allclose(np.asarray(y_with), np.asarray(ref), rtol=1e-5, atol=1e-6)
    Transformer(cfg).apply({"params": params}, toks)  # runs end to end


# ----------------------------------------------------------------------------- adaptive experts

def test_gate_with_live_mask_never_routes_to_dead_experts():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    protos = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    live = jnp.asarray([True, False, True, True, False, False])
    out = top_any_gate(x, protos, jnp.full((6,), -3.0), fallback_k=3, live_E=live)  # low thresholds
    assert not np.any(np.asarray(out.mask)[:, ~np.asarray(live)])
    assert np.all(np.asarray(out.mask).sum(-1) >= 1)
    high = top_any_gate(x, protos, jnp.full((6,), 5.0), fallback_k=4, live_E=live)  # every token falls back
    np.testing.assert_array_equal(np.asarray(high.mask), np.broadcast_to(np.asarray(live), (32, 6)))


def test_window_remove_and_add_constructed_case():
    m = MoEConfig(num_experts=4, intermediate=4, adaptive_experts=True, adaptive_initial=3)
    w = ae.init_window(m, hidden=3)
    np.testing.assert_array_equal(np.asarray(w["live"]), [True, True, True, False])
    x = np.array([[1.0, 0, 0], [0, 2.0, 0], [3.0, 4.0, 0], [0, 0, 5.0]], np.float32)
    # token 0 -> expert 0 above threshold; token 1 -> expert 2; tokens 2, 3 have no expert above
    # threshold (fallback to expert 0 and 2). Expert 1 is never used.
    pre = np.full((4, 4), -0.5, np.float32)
    pre[0, 0], pre[1, 2] = 0.3, 0.2
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 2] = mask[2, 0] = mask[3, 2] = True
    w = ae.accumulate(w, jnp.asarray(mask), jnp.asarray(pre), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(w["hits"]), [2, 0, 2, 0])
    assert float(w["unrouted_count"]) == 2
    np.testing.assert_allclose(np.asarray(w["unrouted_sum"]), unit(x[2]) + unit(x[3]), rtol=1e-6)
    protos = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    theta = jnp.asarray([0.5, 0.7, -0.2, 1.0])
    new, p2, t2, counts = ae.adapt(w, protos, theta)
    # expert 1 removed; the lowest free slot (1) gets the unrouted tokens' normalised sum, theta 0
    np.testing.assert_array_equal(np.asarray(new["live"]), [True, True, True, False])
    np.testing.assert_allclose(np.asarray(p2[:, 1]), unit(unit(x[2]) + unit(x[3])), rtol=1e-6)
    assert float(t2[1]) == 0.0
    np.testing.assert_array_equal(np.asarray(p2)[:, [0, 2, 3]], np.asarray(protos)[:, [0, 2, 3]])
    np.testing.assert_array_equal(np.asarray(t2)[[0, 2, 3]], np.asarray(theta)[[0, 2, 3]])
    assert float(counts["removed"]) == 1 and float(counts["added"]) == 1
    assert float(new["hits"].sum()) == 0 and float(new["unrouted_count"]) == 0
    # no unrouted token: removal only, the slot stays free
    w2 = {**w, "unrouted_count": jnp.zeros([]), "unrouted_sum": jnp.zeros(3)}
    new2, p3, _, _ = ae.adapt(w2, protos, theta)
    np.testing.assert_array_equal(np.asarray(new2["live"]), [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(p3), np.asarray(protos))


def test_dead_experts_are_never_the_gate_target():
    s = jnp.asarray([[0.0, 0.0, 0.3], [0.2, 0.1, 0.4]])
    live = jnp.asarray([False, True, True])
    s_gate = ae.gate_surprise(s, live)
    np.testing.assert_array_equal(np.asarray(jnp.argmin(s_gate, -1)), [1, 1])


@pytest.mark.slow
def test_adaptive_resume_across_add_remove_is_bit_exact(tmp_path):
    from onn_jax.io.checkpointer import Checkpointer
    from onn_jax.io.restore_targets import abstract_like
    cfg = tiny_config(adaptive_experts=True, adaptive_every=2, adaptive_initial=3)
    step = make_train_step(cfg, TX, donate=False)
    state = jax.device_put(jax.jit(init_state, static_argnums=(0, 1))(cfg, TX, jax.random.key(0)),
                           jax.local_devices()[0])
    lives = [np.asarray(state.router_state["block_0"]["live"])]
    changed = 0.0
    for i in range(3):
        state, m = step(state, random_batch(i))
        changed += float(m["moe/experts_added"]) + float(m["moe/experts_removed"])
    with Checkpointer(tmp_path / "ck", save_every=1) as ck:
        assert ck.save(3, state)
    ref = state
    for i in range(3, 6):
        ref, m = step(ref, random_batch(i))
        changed += float(m["moe/experts_added"]) + float(m["moe/experts_removed"])
        lives.append(np.asarray(ref.router_state["block_0"]["live"]))
    assert changed > 0 and any(not np.array_equal(lives[0], l) for l in lives[1:])
    with Checkpointer(tmp_path / "ck") as ck:
        restored, _ = ck.restore(abstract_like(init_state, cfg, TX, jax.random.key(5)))
    for i in range(3, 6):
        restored, _ = step(restored, random_batch(i))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(restored) == jax.tree.structure(ref)


# ----------------------------------------------------------------------------- gate-loss variants

def test_random_tie_argmin_is_uniform_over_the_tied_minima():
    s = jnp.asarray([[0.0, 0.3, 0.0, 0.0, 0.2], [0.5, 0.1, 0.2, 0.3, 0.4]])
    picks = np.stack([np.asarray(gt.random_tie_argmin(s, jax.random.key(k))) for k in range(600)])
    assert set(picks[:, 0]) == {0, 2, 3}
    counts = np.bincount(picks[:, 0], minlength=5)[[0, 2, 3]]
    assert counts.min() > 150  # ~200 each
    assert set(picks[:, 1]) == {1}


def test_nonconstant_rows_and_budget_brute_force():
    s = np.array([[0.1, 0.1, 0.1], [0.0, 0.2, 0.0], [0.3, 0.0, 0.3]], np.float32)
    np.testing.assert_array_equal(np.asarray(gt.nonconstant_rows(jnp.asarray(s))), [False, True, True])
    live = jnp.asarray([True, False, True])
    np.testing.assert_array_equal(np.asarray(gt.nonconstant_rows(jnp.asarray(s), live)), [False, False, False])
    pre = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32) * 0.2
    soft = (1 / (1 + np.exp(-pre / 0.1))).sum(-1)
    np.testing.assert_allclose(float(gt.avg_k_budget(jnp.asarray(pre), 2.0)), (soft.mean() - 2) ** 2, rtol=1e-5)


def test_budget_with_fallback_against_enumeration():
    """expected_k == the expected count over all 2^E activation patterns (a token with none
    active takes fallback_k experts); the budget's value and gradient agree with that sum."""
    import itertools
    pre = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32) * 0.15
    patterns = np.array(list(itertools.product([0, 1], repeat=4)), np.float32)     # [16, E]

    def enumerated_budget(pre_NxE):
        p_NxE = jax.nn.sigmoid(pre_NxE / gt.BUDGET_TAU)
        prob_NxP = jnp.prod(jnp.where(patterns[None] == 1, p_NxE[:, None], 1 - p_NxE[:, None]), -1)
        count_P = jnp.where(patterns.sum(-1) > 0, patterns.sum(-1), 3.0)           # fallback_k = 3
        return jnp.square(jnp.mean(prob_NxP @ count_P) - 2.0), prob_NxP @ count_P

    want, want_k = enumerated_budget(jnp.asarray(pre))
    np.testing.assert_allclose(np.asarray(gt.expected_k(jnp.asarray(pre), 3)), np.asarray(want_k), rtol=1e-5)
    budget = lambda x: gt.avg_k_budget(x, 2.0, fallback_k=3)
    np.testing.assert_allclose(float(budget(jnp.asarray(pre))), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(budget)(jnp.asarray(pre))),
                               np.asarray(jax.grad(lambda x: enumerated_budget(x)[0])(jnp.asarray(pre))),
                               rtol=1e-4, atol=1e-6)
    very_negative = jnp.full((2, 32), -5.0)  # no expert active: every token costs its fallback
    np.testing.assert_allclose(np.asarray(gt.expected_k(very_negative, 16)), [16.0, 16.0], rtol=1e-5)


def test_kl_temperature_and_given_target_against_numpy():
    rng = np.random.default_rng(2)
    pre, s = rng.normal(size=(4, 5)).astype(np.float32), rng.uniform(size=(4, 5)).astype(np.float32) * 0.1
    target = np.array([4, 0, 2, 1])
    loss, parts = hybrid_gate_loss(jnp.asarray(pre), jnp.asarray(s), 0.7, 1.3, kl_temperature=0.05,
                                   target_N=jnp.asarray(target))
    log_q = pre - np.log(np.exp(pre).sum(-1, keepdims=True))
    p = np.exp(-s / 0.05)
    p /= p.sum(-1, keepdims=True)
    ce = -log_q[np.arange(4), target].mean()
    kl = (p * (np.log(p) - log_q)).sum(-1).mean()
    np.testing.assert_allclose([float(parts["ce"]), float(parts["kl"]), float(loss)],
                               [ce, kl, 0.7 * ce + 1.3 * kl], rtol=1e-5)


def test_variant_steps_run_and_budget_is_reported():
    cfg = tiny_config(gate_tie_break="random", gate_tokens="nonconstant", kl_temperature=0.1, w_budget=0.5)
    st, m = make_train_step(cfg, TX, donate=False)(init_state(cfg, TX, jax.random.key(0)), random_batch(0))
    assert np.isfinite(float(m["moe/gate_budget"])) and np.isfinite(float(m["train/total_loss"]))
    # Counting the fallback adds fallback_k * P(none active) to each token's count; at init most
    # tokens have no expert above threshold, so the budget term changes: the option reaches the step.
    fb = tiny_config(gate_tie_break="random", gate_tokens="nonconstant", kl_temperature=0.1, w_budget=0.5,
                     budget_fallback=True)
    _, m_fb = make_train_step(fb, TX, donate=False)(init_state(fb, TX, jax.random.key(0)), random_batch(0))
    assert abs(float(m_fb["moe/gate_budget"]) - float(m["moe/gate_budget"])) > 0.1


@pytest.mark.parametrize("kwargs, field", [
    (dict(aux_free_rate=0.1), "model.moe.aux_free_rate"),          # surprise router
    (dict(router="dense", shared_expert=True), "model.moe.shared_expert"),
    (dict(router="topk", adaptive_experts=True), "model.moe.adaptive_experts"),
    (dict(adaptive_initial=9), "model.moe.adaptive_initial"),
    (dict(gate_tie_break="high"), "model.moe.gate_tie_break"),
    (dict(kl_temperature=0.0), "model.moe.kl_temperature"),
    (dict(gate_tokens="some"), "model.moe.gate_tokens"),
    (dict(router="topk", w_budget=1.0), "model.moe.w_budget"),
    (dict(budget_fallback=True), "model.moe.budget_fallback"),                 # w_budget 0
    (dict(w_budget=1.0, budget_fallback=1), "model.moe.budget_fallback"),
    (dict(w_budget=1.0, budget_fallback=True, adaptive_experts=True), "model.moe.budget_fallback"),
])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        MoEConfig(num_experts=8, **kwargs)
    assert e.value.field == field
