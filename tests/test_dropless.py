"""Dropless dispatch against the dense reference path (float32, rel. error <= 1e-5) and a
NumPy re-statement of its layout and overflow rule."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, rel_err, tiny_config
from test_dispatch import layer_params, with_moe

from onn_jax.config import ConfigError, MoEConfig
from onn_jax.core.experts import expert_outputs
from onn_jax.core.surprise import output_grad_closed_surprise, output_grad_surprise
from onn_jax.core.surprise_variants import learning_cost_surprise
from onn_jax.dispatch.capacity import dropped_fraction
from onn_jax.dispatch.dropless import make_dropless, pair_rows, sum_rows_to_tokens
from onn_jax.dispatch.grouped_gemm import GemmUnavailable, grouped_matmul, is_hopper, resolve_gemm
from onn_jax.dispatch.token_sums import token_sums
from onn_jax.nn.moe import layer_surprise, layer_taps, moe_layer, surprise_inputs
from onn_jax.nn.transformer import init_params
from onn_jax.training.step import compute_grads, step_taps

TOL = 1e-5


def numpy_layout(mask, rows):
    """The documented layout: kept = active pairs of token-major rank < rows; rows sorted by
    expert, then token; padding rows (token N) at the end."""
    n, e = mask.shape
    ranked = [(t, x) for t in range(n) for x in range(e) if mask[t, x]]
    kept = np.zeros_like(mask)
    for t, x in ranked[:rows]:
        kept[t, x] = True
    by_expert = [(t, x) for x in range(e) for t in range(n) if kept[t, x]]
    token_R = np.full(rows, n)
    row_NxE = np.full((n, e), rows)
    for r, (t, x) in enumerate(by_expert):
        token_R[r], row_NxE[t, x] = t, r
    sizes = kept.sum(0)
    sizes[-1] += rows - kept.sum()
    return kept, token_R, row_NxE, sizes


@pytest.mark.parametrize("rows", [1, 9, 17, 65])
def test_layout_and_overflow_match_a_numpy_restatement(rows):
    rng = np.random.default_rng(rows)
    mask = rng.random((13, 5)) < 0.35
    mask[4] = False          # a token with no pair
    mask[:, 2] = False       # an expert with no token
    mask[7] = True           # a token with every expert
    d = jax.tree.map(np.asarray, make_dropless(jnp.asarray(mask), rows))
    kept, token_R, row_NxE, sizes = numpy_layout(mask, rows)
    np.testing.assert_array_equal(d.kept_NxE, kept)
    np.testing.assert_array_equal(d.token_R, token_R)
    np.testing.assert_array_equal(d.row_NxE, row_NxE)
    np.testing.assert_array_equal(d.sizes_E, sizes)
    assert d.sizes_E.sum() == rows
    np.testing.assert_array_equal(d.count_N, kept.sum(1))
    p = kept.sum()
    np.testing.assert_array_equal(d.order_R[:p], [row_NxE[t, x] for t in range(13) for x in range(5) if kept[t, x]])
    assert np.all(d.order_R[p:] == rows)
    np.testing.assert_allclose(dropped_fraction(jnp.asarray(mask), d), 1 - kept.sum() / mask.sum(), rtol=1e-6)


def test_pair_rows_and_config():
    assert pair_rows(100, MoEConfig(num_experts=8)) == 400                    # fallback_k = 4
    assert pair_rows(100, MoEConfig(num_experts=8, router="topk", top_k=3)) == 300
    assert pair_rows(100, MoEConfig(num_experts=8, pair_budget=1.25)) == 125
    assert pair_rows(100, MoEConfig(num_experts=8, pair_budget=8)) == 800     # N * E: never drops
    assert pair_rows(3, MoEConfig(num_experts=8, pair_budget=0.01)) == 1
    for kw, field in [({"pair_budget": 0.0}, "pair_budget"), ({"pair_budget": 9.0}, "pair_budget"),
                      ({"pair_budget": "2"}, "pair_budget"), ({"gemm": "cublas"}, "gemm"),
                      ({"dispatch": "dropless", "surprise": "advantage"}, "surprise")]:
        with pytest.raises(ConfigError, match=f"model.moe.{field}"):
            MoEConfig(num_experts=8, **kw)
    from onn_jax.config import Config, MeshConfig, ModelConfig
    dropless = ModelConfig(moe=MoEConfig(dispatch="dropless"))
    Config(model=dropless, mesh=MeshConfig(expert=2))  # expert parallel: tests/test_expert_parallel.py
    Config(model=dropless, mesh=MeshConfig(expert=1))


def test_grouped_gemm_backends_equal_a_loop_and_refuse_mosaic_off_hopper():
    rng = np.random.default_rng(0)
    sizes = np.array([3, 0, 5, 1, 0, 7])  # empty groups included; sums to R
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 4, 3)), jnp.float32)
    g = np.repeat(np.arange(6), sizes)
    ref = np.einsum("rk,rkn->rn", np.asarray(x), np.asarray(w)[g])
    for backend in ("ragged_dot", "padded"):
        y = grouped_matmul(x, w, jnp.asarray(sizes), backend)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=backend)
    dy = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    f = lambda b: jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes), b) * dy),
                           argnums=(0, 1))(x, w)
    assert rel_err(f("padded"), f("ragged_dot")) < 1e-6
    assert resolve_gemm("auto", jnp.float32) == "ragged_dot"
    if jax.devices()[0].platform == "cpu":
        with pytest.raises(GemmUnavailable, match="Hopper"):
            resolve_gemm("mosaic_gpu", jnp.bfloat16)


@pytest.mark.parametrize("impl", ["loop", "pallas"])
def test_per_token_sums_are_the_weighted_row_sums_and_their_backward_gathers(impl):
    """Both implementations of onn_jax.dispatch.token_sums (the Pallas kernel in interpret mode on CPU)
    against a NumPy per-token sum, uneven counts including a token with every expert and one
    with none; gradients against NumPy's gathers."""
    rng = np.random.default_rng(1)
    mask = rng.random((11, 6)) < 0.5
    mask[3], mask[8] = True, False
    d = make_dropless(jnp.asarray(mask), 30)
    a = jnp.asarray(rng.normal(size=(30, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(30,)), jnp.float32)
    sums = lambda a, w: token_sums(a, w, d.order_R, d.start_N, d.count_N, d.token_R, impl)
    token_R = np.asarray(d.token_R)
    live = token_R < 11
    ref = np.zeros((11, 32))
    np.add.at(ref, token_R[live], (np.asarray(w)[:, None] * np.asarray(a))[live])
    np.testing.assert_allclose(sums(a, w), ref, rtol=1e-6, atol=1e-6)
    g = jnp.asarray(rng.normal(size=(11, 32)), jnp.float32)
    da, dw = jax.grad(lambda a, w: jnp.sum(sums(a, w) * g), (0, 1))(a, w)
    g_R = np.where(live[:, None], np.asarray(g)[np.minimum(token_R, 10)], 0)
    np.testing.assert_allclose(da, np.asarray(w)[:, None] * g_R, rtol=1e-6)
    np.testing.assert_allclose(dw, np.sum(g_R * np.asarray(a), -1), rtol=1e-5, atol=1e-6)
    if impl == "loop":  # the unweighted sum (the dispatch's backward) is the same function
        np.testing.assert_allclose(sum_rows_to_tokens(a, d), sums(a, jnp.ones(30)), rtol=1e-6)


def layer_vjp(params, x, cfg, seed, y_tap=True):
    r = jax.random.normal(jax.random.key(seed), (x.shape[0], x.shape[1]))
    taps = layer_taps(cfg, x.shape[0], x.shape[1], y_tap)

    def f(params, x, taps):
        out, rec = moe_layer(params, x, cfg, taps)
        return jnp.sum(out * r), (out, rec)

    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    (_, (out, rec)), grads = vg(params, x, taps)
    return out, rec, grads[:2], grads[2]


@pytest.mark.slow
@pytest.mark.parametrize("router,kind,gemm,token_sum", [("surprise", "gelu", "ragged_dot", "loop"),
                                                        ("surprise", "gelu", "ragged_dot", "pallas"),
                                                        ("topk", "swiglu", "padded", "loop")])
def test_layer_equals_dense_output_surprise_and_gradients(router, kind, gemm, token_sum):
    dense = MoEConfig(num_experts=8, intermediate=12, router=router, top_k=3, expert_kind=kind,
                      fallback_k=3)
    dropless = dataclasses.replace(dense, dispatch="dropless", gemm=gemm, pair_budget=8.0,
                                   token_sum=token_sum)
    params = layer_params(1, kind=kind)
    x = jax.random.normal(jax.random.key(2), (24, 16))
    x = x.at[:, 0].set(jnp.abs(x[:, 0]) + 1.0)                 # every token leans on axis 0,
    params["prototypes"] = params["prototypes"].at[:, 5].set(-4 * jnp.eye(16)[0])  # expert 5 away
    params["thresholds"] = params["thresholds"].at[5].set(5.0)
    if router == "topk":
        params["router"] = params.pop("prototypes")
    out_d, rec_d, g_d, t_d = layer_vjp(params, x, dense, 3)
    out_s, rec_s, g_s, t_s = layer_vjp(params, x, dropless, 3)
    mask = np.asarray(rec_d.router.mask)
    load = mask.sum(0)
    assert load[5] == 0 and load.max() >= 3 * np.sort(load)[1]  # an empty expert, uneven load
    if router == "surprise":
        natural = (np.asarray(rec_d.router.pre) > 0).sum(1)
        assert (natural == 0).any() and (natural > 1).any()       # fallback and multi-expert tokens
    assert rel_err(out_s, out_d) < TOL
    assert rel_err(g_s, g_d) < TOL
    s_d = output_grad_surprise(surprise_inputs(rec_d, t_d))
    s_s = layer_surprise(output_grad_surprise, rec_s, t_s)   # row norms, then to [N, E]
    assert rel_err(s_s, s_d) < TOL
    assert np.all(np.asarray(s_s)[~mask] == 0) and np.all(np.asarray(s_s)[mask] > 0)
    np.testing.assert_allclose(output_grad_surprise(surprise_inputs(rec_s, t_s)), s_s, rtol=1e-6)
    assert rel_err(output_grad_closed_surprise(surprise_inputs(rec_s, t_s)),
                   output_grad_closed_surprise(surprise_inputs(rec_d, t_d))) < TOL


def test_overflow_drops_exactly_the_documented_pairs():
    cfg = MoEConfig(num_experts=8, intermediate=12, dispatch="dropless", pair_budget=1.5,
                    fallback_k=3)
    params = layer_params(4)
    x = jax.random.normal(jax.random.key(5), (40, 16))
    out, rec, _, d_taps = layer_vjp(params, x, cfg, 6)
    mask = np.asarray(rec.router.mask)
    kept, *_ = numpy_layout(mask, 60)
    assert (mask & ~kept).any() and mask.sum() > 60
    np.testing.assert_array_equal(rec.dispatch.kept_NxE, kept)
    # Independent reference: the dense layer with the dropped pairs' weights set to 0.
    w = np.where(kept, np.asarray(rec.router.weights), 0.0)
    y = np.asarray(expert_outputs(params["experts"], x))
    np.testing.assert_allclose(out, np.einsum("ne,nec->nc", w, y), rtol=1e-5, atol=1e-5)
    s = np.asarray(layer_surprise(output_grad_surprise, rec, d_taps))
    assert np.all(s[~kept] == 0) and np.all(s[kept] > 0)
    np.testing.assert_allclose(dropped_fraction(rec.router.mask, rec.dispatch),
                               1 - kept.sum() / mask.sum(), rtol=1e-6)


def test_without_the_row_tap_surprise_and_gradients_equal_the_tapped_layer():
    """Surprise from dL/dout alone (no [R, C] tap; y_tap_needed) equals the row-tap Surprise on
    kept pairs and is 0 on dropped ones; output and gradients are unchanged."""
    cfg = MoEConfig(num_experts=8, intermediate=12, dispatch="dropless", pair_budget=1.5, fallback_k=3)
    params = layer_params(4)
    x = jax.random.normal(jax.random.key(5), (40, 16))
    out_t, rec_t, g_t, taps_t = layer_vjp(params, x, cfg, 6)
    out_n, rec_n, g_n, taps_n = layer_vjp(params, x, cfg, 6, y_tap=False)
    kept = np.asarray(rec_n.dispatch.kept_NxE)
    assert taps_n.expert_out is None and (np.asarray(rec_n.router.mask) & ~kept).any()  # some pairs drop
    np.testing.assert_array_equal(out_n, out_t)
    assert rel_err(g_n, g_t) < 1e-6
    for fn in (output_grad_surprise, output_grad_closed_surprise):
        s_n, s_t = layer_surprise(fn, rec_n, taps_n), layer_surprise(fn, rec_t, taps_t)
        np.testing.assert_allclose(s_n, s_t, rtol=1e-5, atol=1e-7, err_msg=fn.__name__)
    assert np.all(np.asarray(layer_surprise(output_grad_surprise, rec_n, taps_n))[~kept] == 0)
    with pytest.raises(ValueError, match="reads dL/dY"):
        layer_surprise(learning_cost_surprise, rec_n, taps_n)


def test_rows_stay_in_the_compute_dtype_without_the_row_tap():
    cfg = MoEConfig(num_experts=8, intermediate=16, dispatch="dropless", pair_budget=3.0, fallback_k=3)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), layer_params(1))
    x = jax.random.normal(jax.random.key(1), (24, 16), jnp.bfloat16)
    _, tapped = moe_layer(params, x, cfg, layer_taps(cfg, 24, 16))
    out, untapped = moe_layer(params, x, cfg, layer_taps(cfg, 24, 16, y_tap=False))
    assert tapped.expert_out.dtype == jnp.float32 and untapped.expert_out.dtype == jnp.bfloat16
    assert out.dtype == jnp.float32  # combined in float32 either way


def test_step_taps_follow_the_router_and_the_surprise_function():
    dl = with_moe(tiny_config(), dispatch="dropless", pair_budget=3.0)
    assert step_taps(tiny_config(router="topk"), 2, 8) is None                 # top-k: no Surprise
    assert step_taps(with_moe(dl, router="topk"), 2, 8) is None
    assert all(t.expert_out is None for t in step_taps(dl, 2, 8))               # output_grad: dL/dout only
    assert all(t.expert_out is None for t in step_taps(dl, 2, 8, "output_grad_closed"))
    rows = step_taps(dl, 2, 8, learning_cost_surprise)                           # reads dL/dY
    assert all(t.expert_out.shape == (pair_rows(16, dl.moe), dl.hidden) for t in rows)
    assert step_taps(tiny_config(), 2, 8)[0].expert_out.shape == (16, 8, dl.hidden)  # dense: the faithful tap


@pytest.mark.slow
def test_train_gradients_and_metrics_equal_dense():
    cfg = tiny_config(num_layers=2, expert_kind="swiglu", fallback_k=3)
    params = init_params(cfg, jax.random.key(12))
    params = jax.tree_util.tree_map_with_path(  # lower thresholds: k varies per token
        lambda p, v: v - 2.5 if "thresholds" in jax.tree_util.keystr(p) else v, params)
    batch = random_batch(13)
    g_d, m_d = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    dl = with_moe(cfg, dispatch="dropless", pair_budget=8.0)
    g_s, m_s = jax.jit(lambda p: compute_grads(p, batch, dl))(params)
    assert 1 < float(m_d["moe/avg_k"]) < 8
    assert rel_err(g_s, g_d) < TOL
    for key in ("train/main_loss", "train/main_acc", "moe/gate_loss", "moe/surprise_mean",
                "moe/gate_acc", "moe/gate_acc_unmasked", "moe/avg_k", "moe/expert_load"):
        np.testing.assert_allclose(m_s[key], m_d[key], rtol=TOL, atol=1e-7, err_msg=key)
    assert float(m_s["moe/dropped_frac"]) == 0.0
    _, m_drop = jax.jit(lambda p: compute_grads(p, batch, with_moe(cfg, dispatch="dropless",
                                                                  pair_budget=1.0)))(params)
    assert 0.0 < float(m_drop["moe/dropped_frac"]) < 1.0


@pytest.mark.parametrize("token_sum", ["loop", "pallas"])
def test_step_is_bitwise_deterministic(token_sum):
    """Same inputs, same bits (on a GPU this checks that no atomics order the sums)."""
    cfg = with_moe(tiny_config(num_layers=1), dispatch="dropless", pair_budget=8.0, token_sum=token_sum)
    params = init_params(cfg, jax.random.key(3))
    batch = random_batch(4)
    step = jax.jit(lambda p: compute_grads(p, batch, cfg))
    first, second = step(params), step(params)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not is_hopper(), reason="Mosaic GPU kernels need a Hopper GPU")
def test_mosaic_gpu_equals_a_float32_reference():
    rng = np.random.default_rng(2)
    sizes = jnp.asarray([300, 0, 517, 64, 0, 1, 2000, 118])       # empty, tiny and big groups
    x = jnp.asarray(rng.normal(size=(3000, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 128, 256)) / np.sqrt(128), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(3000, 256)), jnp.bfloat16)
    f = lambda b, dt: jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(grouped_matmul(x.astype(dt), w.astype(dt), sizes, b).astype(jnp.float32)
                             * dy.astype(jnp.float32)), argnums=(0, 1)))(x, w)
    got = f("mosaic_gpu", jnp.bfloat16)
    ref = f("ragged_dot", jnp.float32)
    assert rel_err(got[1], ref[1]) < 2e-2
    y = grouped_matmul(x, w, sizes, "mosaic_gpu")
    assert rel_err(y.astype(jnp.float32), grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                                                         sizes, "ragged_dot")) < 2e-2
