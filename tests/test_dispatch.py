"""Sparse capacity dispatch against the dense reference path and brute-force references."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import MoEConfig
from onn_jax.core.surprise import output_grad_closed_surprise, output_grad_surprise
from onn_jax.dispatch.capacity import dropped_fraction, expert_capacity, make_dispatch
from onn_jax.nn.moe import layer_surprise, layer_taps, moe_layer, surprise_inputs
from onn_jax.nn.transformer import init_params
from onn_jax.training.step import compute_grads


def with_moe(cfg, **kw):
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **kw))


def layer_params(seed, c=16, e=8, i=12, kind="gelu"):
    ks = jax.random.split(jax.random.key(seed), 5)
    experts = {"w1": jax.random.normal(ks[0], (e, c, i)) / np.sqrt(c),
               "w2": jax.random.normal(ks[1], (e, i, c)) / np.sqrt(i)}
    if kind == "swiglu":
        experts["w3"] = jax.random.normal(ks[4], (e, c, i)) / np.sqrt(c)
    return {"experts": experts, "prototypes": jax.random.normal(ks[2], (c, e)),
            "thresholds": jax.random.normal(ks[3], (e,)) - 2.0}  # sigmoid(theta) ~ 0.1: k varies


def test_make_dispatch_matches_a_loop():
    rng = np.random.default_rng(0)
    mask = rng.random((13, 5)) < 0.4
    cap = 2
    d = jax.tree.map(np.asarray, make_dispatch(jnp.asarray(mask), cap))
    for e in range(5):
        tokens = np.flatnonzero(mask[:, e])
        kept = tokens[:cap]
        np.testing.assert_array_equal(d.token_ExK[e], np.pad(kept, (0, cap - len(kept)), constant_values=13))
        for t in range(13):
            in_cap = t in kept
            assert d.kept_NxE[t, e] == in_cap
            assert d.slot_NxE[t, e] == (list(kept).index(t) if in_cap else cap)
    # Token-major order of the kept slots, and the tail of unused entries.
    kept_pairs = [(t, e) for t in range(13) for e in range(5) if d.kept_NxE[t, e]]
    p = len(kept_pairs)
    np.testing.assert_array_equal(d.order_P[:p], [e * cap + d.slot_NxE[t, e] for t, e in kept_pairs])
    np.testing.assert_array_equal(d.order_token_P[:p], [t for t, _ in kept_pairs])
    assert np.all(d.order_P[p:] == 5 * cap) and np.all(d.order_token_P[p:] == 13)
    expected_drop = (mask.sum() - d.kept_NxE.sum()) / mask.sum()
    np.testing.assert_allclose(dropped_fraction(jnp.asarray(mask), make_dispatch(jnp.asarray(mask), cap)),
                               expected_drop, rtol=1e-6)


def test_expert_capacity():
    n = 100
    assert expert_capacity(n, MoEConfig(num_experts=8)) == n  # None: never drop
    assert expert_capacity(n, MoEConfig(num_experts=8, capacity_factor=1.0)) == 50  # k_ref = E/2 = 4
    assert expert_capacity(n, MoEConfig(num_experts=8, router="topk", top_k=2, capacity_factor=1.25)) == 32
    assert expert_capacity(n, MoEConfig(num_experts=8, capacity_factor=100.0)) == n
    assert expert_capacity(n, MoEConfig(num_experts=8, capacity_factor=1e-6)) == 1


def layer_vjp(params, x, cfg, seed, with_taps=False):
    """Layer output, the surprise-function inputs of the loss <out, r>, and d<out, r>/d(params, x)
    (and the taps' cotangents with `with_taps`)."""
    r = jax.random.normal(jax.random.key(seed), (x.shape[0], x.shape[1]))
    taps = layer_taps(cfg, x.shape[0], x.shape[1])

    def f(params, x, taps):
        out, rec = moe_layer(params, x, cfg, taps)
        return jnp.sum(out * r), (out, rec)

    (_, (out, rec)), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(params, x, taps)
    if with_taps:
        return out, rec, surprise_inputs(rec, grads[2]), grads[:2], grads[2]
    return out, rec, surprise_inputs(rec, grads[2]), grads[:2]


@pytest.mark.slow
@pytest.mark.parametrize("router,kind", [("surprise", "gelu"), ("topk", "swiglu")])
def test_sparse_layer_equals_dense_when_nothing_is_dropped(router, kind):
    dense = MoEConfig(num_experts=8, intermediate=12, router=router, top_k=3, expert_kind=kind)
    sparse = dataclasses.replace(dense, dispatch="sparse")
    params = layer_params(1, kind=kind)
    if router == "topk":
        params["router"] = params.pop("prototypes")
    x = jax.random.normal(jax.random.key(2), (24, 16))
    out_d, rec_d, s_d, g_d = layer_vjp(params, x, dense, 3)
    out_s, rec_s, s_s, g_s = layer_vjp(params, x, sparse, 3)
    mask = np.asarray(rec_d.router.mask)
    assert 0 < mask.sum() < mask.size  # some pairs inactive: the sparse path skips them
    assert rel_err(out_s, out_d) < 1e-6
    assert rel_err(g_s, g_d) < 1e-5  # every parameter gradient and dL/dx
    surprise_d, surprise_s = output_grad_surprise(s_d), output_grad_surprise(s_s)
    assert rel_err(surprise_s, surprise_d) < 1e-6
    assert np.all(np.asarray(surprise_s)[~mask] == 0) and np.all(np.asarray(surprise_s)[mask] > 0)
    # Y and dL/dY agree on active pairs (the dense path also holds Y of inactive pairs).
    for a, b in [(s_s.expert_out, s_d.expert_out), (s_s.d_expert_out, s_d.d_expert_out)]:
        np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropped_pairs_add_nothing_and_have_zero_surprise():
    cfg = MoEConfig(num_experts=8, intermediate=12, dispatch="sparse", capacity_factor=0.3)  # K = 7
    params = layer_params(4)
    x = jax.random.normal(jax.random.key(5), (40, 16))
    out, rec, s_in, _, d_taps = layer_vjp(params, x, cfg, 6, with_taps=True)
    d = jax.tree.map(np.asarray, rec.dispatch)
    mask = np.asarray(rec.router.mask)
    assert (mask & ~d.kept_NxE).any()  # some pairs dropped
    # Independent reference: the dense layer with the dropped pairs' weights set to 0.
    dense_cfg = dataclasses.replace(cfg, dispatch="dense")
    ref_out, _ = moe_layer(params, x, dense_cfg)
    w = np.asarray(rec.router.weights)
    dropped_w = np.where(mask & ~d.kept_NxE, w, 0.0)
    from onn_jax.core.experts import expert_outputs
    y = np.asarray(expert_outputs(params["experts"], x))
    np.testing.assert_allclose(out, np.asarray(ref_out) - np.einsum("ne,nec->nc", dropped_w, y),
                               rtol=1e-5, atol=1e-5)
    s = np.asarray(output_grad_surprise(s_in))
    assert np.all(s[~d.kept_NxE] == 0) and np.all(s[d.kept_NxE] > 0)
    # The step's slot-space Surprise (norms over slot rows, then a gather) is the same S.
    np.testing.assert_allclose(layer_surprise(output_grad_surprise, rec, d_taps), s, rtol=1e-6, atol=0)
    np.testing.assert_allclose(layer_surprise(output_grad_closed_surprise, rec, d_taps),
                               output_grad_closed_surprise(s_in), rtol=1e-6, atol=0)
    # The closed form gives dropped pairs their dense Surprise w * |dL/dout| instead.
    closed = np.asarray(output_grad_closed_surprise(s_in))
    np.testing.assert_allclose(closed[d.kept_NxE], s[d.kept_NxE], rtol=1e-5)
    assert np.all(closed[mask & ~d.kept_NxE] > 0)


def test_closed_form_surprise_equals_the_faithful_one_on_the_dense_path():
    cfg = MoEConfig(num_experts=8, intermediate=12)
    _, rec, s_in, _ = layer_vjp(layer_params(7), jax.random.normal(jax.random.key(8), (24, 16)), cfg, 9)
    assert rel_err(output_grad_closed_surprise(s_in), output_grad_surprise(s_in)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("moe_kwargs", [{}, {"expert_kind": "swiglu", "fallback_k": 3}])
def test_sparse_train_gradients_equal_dense(moe_kwargs):
    cfg = tiny_config(num_layers=2, **moe_kwargs)
    params = init_params(cfg, jax.random.key(12))
    params = jax.tree_util.tree_map_with_path(  # lower thresholds: k varies per token
        lambda p, v: v - 2.5 if "thresholds" in jax.tree_util.keystr(p) else v, params)
    batch = random_batch(13)
    g_d, m_d = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    g_s, m_s = jax.jit(lambda p: compute_grads(p, batch, with_moe(cfg, dispatch="sparse")))(params)
    assert 1 < float(m_d["moe/avg_k"]) < 8
    assert rel_err(g_s, g_d) < 1e-5
    for key in ("train/main_loss", "moe/gate_loss", "moe/surprise_mean", "moe/gate_acc", "moe/avg_k"):
        np.testing.assert_allclose(m_s[key], m_d[key], rtol=1e-5, err_msg=key)
    assert float(m_s["moe/dropped_frac"]) == 0.0 and "moe/dropped_frac" not in m_d
    dropping = with_moe(cfg, dispatch="sparse", capacity_factor=0.25)
    _, m_drop = jax.jit(lambda p: compute_grads(p, batch, dropping))(params)
    assert 0.0 < float(m_drop["moe/dropped_frac"]) < 1.0
