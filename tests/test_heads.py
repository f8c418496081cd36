"""Gated attention heads (model.heads) against dense attention and brute-force autodiff."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import ConfigError, HeadsConfig, ModelConfig
from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss
from onn_jax.core.surprise import SurpriseInputs
from onn_jax.core.surprise_registry import get_surprise_fn
from onn_jax.nn.generate import generate
from onn_jax.nn.transformer import Transformer, init_params, model_taps
from onn_jax.nn.units import unit_records, unit_taps
from onn_jax.training.step import compute_grads


def heads_config(router="surprise", num_layers=2, moe_router="surprise", **heads):
    cfg = tiny_config(num_layers=num_layers, router=moe_router)
    return dataclasses.replace(cfg, num_heads=4, heads=HeadsConfig(router=router, **heads))


def apply(cfg, params, batch, taps=None, utaps=None):
    """(logits, head records) of one forward with the given MoE and head taps."""
    (logits, _), state = Transformer(cfg).apply({"params": params}, batch["inputs"], taps,
                                                unit_taps=utaps, mutable=["gated"])
    return logits, unit_records(cfg, state["gated"]).heads


def param_tree(cfg):
    """The parameter tree's shapes (no computation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def main_loss(cfg, params, batch, utaps):
    logits, _ = apply(cfg, params, batch, model_taps(cfg, *batch["inputs"].shape), utaps)
    return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]


def setup(seed=0, **kw):
    cfg = heads_config(**kw)
    params = init_params(cfg, jax.random.key(seed))
    batch = random_batch(seed)
    utaps = unit_taps(cfg, *batch["inputs"].shape)
    _, records = jax.jit(lambda p: apply(cfg, p, batch, model_taps(cfg, *batch["inputs"].shape), utaps))(params)
    d_utaps = jax.jit(jax.grad(lambda u: main_loss(cfg, params, batch, u)))(utaps)
    return cfg, params, batch, utaps, records, d_utaps


def test_defaults_keep_the_phase1_parameter_tree_and_config_validates():
    cfg = tiny_config()
    assert cfg.heads == HeadsConfig() and not cfg.heads.gated
    attn = param_tree(cfg)["block_0"]["attn"]
    assert sorted(attn) == ["key", "out", "query", "value"]
    gated = param_tree(heads_config())["block_0"]["attn"]
    assert sorted(gated) == ["head_prototypes", "head_thresholds", "key", "out", "query", "value"]
    assert gated["out"]["kernel"].shape == (4, 4, 16) and attn["out"]["kernel"].shape == (2, 8, 16)
    assert sorted(param_tree(heads_config("topk"))["block_0"]["attn"])[0] == "head_router"
    for bad, field in [(dict(router="x"), "model.heads.router"), (dict(combine="x"), "model.heads.combine"),
                       (dict(gate_tokens="x"), "model.heads.gate_tokens"), (dict(w_aux=-1.0), "model.heads.w_aux")]:
        with pytest.raises(ConfigError, match=field):
            HeadsConfig(**bad)
    for bad, field in [(dict(fallback_k=5), "model.heads.fallback_k"), (dict(top_k=5), "model.heads.top_k")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig(hidden=16, num_heads=4, heads=HeadsConfig(**bad))


def test_all_heads_with_equal_weights_is_dense_attention():
    """Thresholds at +inf (no head above) and fallback_k = H: every head with w = 1/H, and
    `scaled` multiplies by k = H, so the model equals the dense one with the same weights."""
    dense_cfg = dataclasses.replace(tiny_config(), num_heads=4)
    cfg = heads_config(fallback_k=4)
    params = init_params(cfg, jax.random.key(1))
    for i in range(cfg.num_layers):
        params["block_%d" % i]["attn"]["head_thresholds"] = jnp.full((4,), 50.0)
    dense_params = jax.tree.map(lambda a: a, params)
    for i in range(cfg.num_layers):
        for k in ("head_thresholds", "head_prototypes"):
            dense_params["block_%d" % i]["attn"].pop(k)
    batch = random_batch(1)
    logits, records = jax.jit(lambda p: apply(cfg, p, batch))(params)
    dense_logits, _ = jax.jit(lambda p: Transformer(dense_cfg).apply({"params": p}, batch["inputs"]))(dense_params)
    np.testing.assert_allclose(logits, dense_logits, rtol=1e-5, atol=1e-5)
    for r in records:
        assert np.all(np.asarray(r.router.mask)) and np.allclose(r.router.weights, 0.25)


def test_default_fallback_is_half_the_heads_and_weights_sum_to_one():
    cfg, params, batch, utaps, records, _ = setup(seed=2)
    for r in records:
        k = np.asarray(r.router.mask).sum(-1)
        fallback = ~np.any(np.asarray(r.router.pre) > 0, -1)
        assert fallback.any() and np.all(k[fallback] == 2)
        np.testing.assert_allclose(np.asarray(r.router.weights).sum(-1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(r.router.weights)[~np.asarray(r.router.mask)] == 0)


@pytest.mark.parametrize("combine", ["scaled", "softmax"])
def test_head_output_cotangent_is_weight_times_g_and_surprise_vanishes_when_inactive(combine):
    cfg, params, batch, utaps, records, d_utaps = setup(seed=3, combine=combine, num_layers=1)
    r, d = records[0], d_utaps.heads[0]
    yt0 = r.expert_out
    # Brute force: dL/dYt by jacrev through the tap (tap = y - Yt(params)).
    loss_of_y = lambda y: main_loss(cfg, params, batch, utaps._replace(
        heads=(utaps.heads[0]._replace(expert_out=y - jax.lax.stop_gradient(yt0)),)))
    jac = jax.jit(jax.jacrev(loss_of_y))(yt0)
    w, g = r.router.weights, d.moe_out
    np.testing.assert_allclose(jac, d.expert_out, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(jac, w[..., None] * g[:, None], rtol=1e-5, atol=1e-9)
    # dL/dY = s_t w g with s_t = k_t (scaled) or 1: Y enters as Yt = s_t Y.
    s_t = np.asarray(r.router.mask).sum(-1) if combine == "scaled" else np.ones(w.shape[0])
    y = r.expert_out / s_t[:, None, None]
    loss_of_raw = lambda y_: loss_of_y(s_t[:, None, None] * y_)
    np.testing.assert_allclose(jax.jit(jax.jacrev(loss_of_raw))(y), s_t[:, None, None] * w[..., None] * g[:, None],
                               rtol=1e-5, atol=1e-9)
    for name in ("output_grad", "output_grad_closed"):
        s = np.asarray(get_surprise_fn(name)(SurpriseInputs(d.expert_out, g, yt0, w, r.router.mask)))
        np.testing.assert_allclose(s, np.asarray(w) * np.linalg.norm(g, axis=-1)[:, None], rtol=1e-5, atol=1e-9)
        assert np.all(s[~np.asarray(r.router.mask)] == 0)


def test_advantage_equals_the_derivative_along_the_simplex_for_every_token_and_head():
    """A[t,h] == d/de L with w_t -> (1-e) w_t + e onehot(h) (k_t held), for all (t, h) at once:
    the Jacobian of L w.r.t. eps[t,h] moving out_t by eps (Yt[t,h] - out_t)."""
    cfg, params, batch, utaps, records, d_utaps = setup(seed=4, surprise="advantage")
    for layer in range(cfg.num_layers):
        r = records[layer]
        yt, w = jax.lax.stop_gradient(r.expert_out), jax.lax.stop_gradient(r.router.weights)
        out = jnp.einsum("nh,nhc->nc", w, yt)

        def loss_of_mix(eps_NxH):
            heads = list(utaps.heads)
            heads[layer] = heads[layer]._replace(moe_out=jnp.einsum("nh,nhc->nc", eps_NxH, yt - out[:, None]))
            return main_loss(cfg, params, batch, utaps._replace(heads=tuple(heads)))

        brute = jax.jit(jax.grad(loss_of_mix))(jnp.zeros_like(w))
        d = d_utaps.heads[layer]
        a = get_surprise_fn("advantage")(SurpriseInputs(d.expert_out, d.moe_out, yt, w, r.router.mask))
        np.testing.assert_allclose(a, brute, rtol=1e-5, atol=1e-9)
        inactive = ~np.asarray(r.router.mask)
        assert inactive.any() and np.any(np.abs(np.asarray(a)[inactive]) > 0)


@pytest.mark.parametrize("combine", ["scaled", "softmax"])
def test_head_learning_cost_equals_per_token_gradient_norms(combine):
    """LC[t,h] == | grad over (W_q[:, h], W_out[h]) of <g_t, Yt[t,h]> |, by jax.grad per token."""
    cfg, params, batch, utaps, records, d_utaps = setup(seed=5, combine=combine, num_layers=1,
                                                        surprise="learning_cost")
    r, d = records[0], d_utaps.heads[0]
    lc = np.asarray(get_surprise_fn("learning_cost")(SurpriseInputs(
        d.expert_out, d.moe_out, r.expert_out, r.router.weights, r.router.mask, r.expert_in, r.expert_params)))
    g_NxC = d.moe_out
    s_N = r.expert_params.scale_N
    attn_p = params["block_0"]["attn"]
    b, t = batch["inputs"].shape

    def yt_of(wq, wout):  # Yt [N, H, C] as a function of W_q and W_out (keys/values fixed)
        p = jax.tree.map(lambda a: a, params)
        p["block_0"]["attn"] = dict(attn_p, query={"kernel": wq}, out={"kernel": wout})
        _, recs = apply(cfg, p, batch, None, utaps)
        return recs[0].expert_out

    @jax.jit
    def per_token_grads(n, h):
        f = lambda wq, wo: jnp.sum(g_NxC[n] * yt_of(wq, wo)[n, h])
        return jax.grad(f, argnums=(0, 1))(attn_p["query"]["kernel"], attn_p["out"]["kernel"])

    def one(n, h):
        gq, go = per_token_grads(n, h)
        # Only head h's own slices may be touched (other heads never reach Yt[t, h]).
        others = np.delete(np.asarray(gq), h, axis=1)
        assert np.all(others == 0) and np.all(np.delete(np.asarray(go), h, axis=0) == 0)
        return np.sqrt(np.sum(np.square(gq)) + np.sum(np.square(go)))

    checked = [(n, h) for n in range(0, b * t, 3) for h in range(4)]
    brute = np.array([one(n, h) for n, h in checked])
    np.testing.assert_allclose(np.array([lc[n, h] for n, h in checked]), brute, rtol=1e-4, atol=1e-8)
    assert np.all(lc.reshape(b, t, 4)[:, :3] == 0) and np.all(s_N >= 1)


def naive_grads(cfg, params, batch):
    """grad(main) + w_aux * grad(gate) per kind, S from jax.grad of the main loss (held const)."""
    b, t = batch["inputs"].shape
    taps, utaps = model_taps(cfg, b, t), unit_taps(cfg, b, t)

    def records_of(p):
        (logits, moe), state = Transformer(cfg).apply({"params": p}, batch["inputs"], taps,
                                                      unit_taps=utaps, mutable=["gated"])
        return logits, moe, unit_records(cfg, state["gated"]).heads

    def loss_of_taps(tp, utp):
        (logits, _), _ = Transformer(cfg).apply({"params": params}, batch["inputs"], tp, unit_taps=utp,
                                                mutable=["gated"])
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    d_taps, d_utaps = jax.grad(loss_of_taps, argnums=(0, 1))(taps, utaps)
    s_moe = [jnp.linalg.norm(d.expert_out, axis=-1) for d in d_taps] if cfg.moe.router == "surprise" else None
    _, _, head_recs = records_of(params)
    sfn = get_surprise_fn(cfg.heads.surprise)
    s_heads = [sfn(SurpriseInputs(d.expert_out, d.moe_out, r.expert_out, r.router.weights, r.router.mask,
                                  r.expert_in, r.expert_params))
               for d, r in zip(d_utaps.heads, head_recs)]
    mask = batch["loss_mask"].reshape(-1) if cfg.heads.gate_tokens == "unmasked" else None

    def main(p):
        return next_token_loss(records_of(p)[0], batch["targets"], batch["loss_mask"])[0]

    def moe_gate(p):
        _, moe, _ = records_of(p)
        return sum(hybrid_gate_loss(r.router.pre, s, cfg.moe.w_ce, cfg.moe.w_kl)[0] for r, s in zip(moe, s_moe))

    def head_gate(p):
        _, _, heads = records_of(p)
        h = cfg.heads
        if h.router == "topk":
            return sum(h.lb_weight * load_balancing_loss(r.router.logits, r.router.mask) for r in heads)
        return sum(hybrid_gate_loss(r.router.pre, jax.lax.stop_gradient(s), h.w_ce, h.w_kl, mask)[0]
                   for r, s in zip(heads, s_heads))

    g = jax.grad(main)(params)
    if cfg.moe.router == "surprise":
        g = jax.tree.map(lambda a, b_: a + cfg.moe.w_aux * b_, g, jax.grad(moe_gate)(params))
    return jax.tree.map(lambda a, b_: a + cfg.heads.w_aux * b_, g, jax.grad(head_gate)(params))


@pytest.mark.parametrize("kw", [
    dict(router="surprise", surprise="advantage", gate_tokens="unmasked", w_aux=0.5, w_ce=0.7),
    dict(router="surprise", surprise="learning_cost", combine="softmax", num_layers=1),
    dict(router="topk", top_k=2, lb_weight=0.3, num_layers=1),
])
def test_unified_gradient_with_moe_and_heads_gated_equals_naive_two_pass(kw):
    cfg = heads_config(**kw)
    kw.pop("num_layers", None)
    params = init_params(cfg, jax.random.key(6))
    batch = random_batch(6)
    grads, metrics = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    expected = jax.jit(lambda p: naive_grads(cfg, p, batch))(params)
    assert rel_err(grads, expected) < 1e-5, rel_err(grads, expected)
    assert rel_err(grads["block_0"]["attn"], expected["block_0"]["attn"]) < 1e-5
    assert metrics["attn/head_load"].shape == (cfg.num_layers, 4)
    assert 1 <= float(metrics["attn/avg_k"]) <= 4
    if kw["router"] == "surprise":
        for key in ("gate_ce", "gate_kl", "gate_acc", "gate_acc_unmasked", "fallback_frac",
                    "target_inactive", "surprise_mean", "threshold_mean"):
            assert np.isfinite(float(metrics[f"attn/{key}"])), key
        total = metrics["train/main_loss"] + metrics["moe/gate_loss"] + kw.get("w_aux", 1.0) * metrics["attn/gate_loss"]
        np.testing.assert_allclose(metrics["train/total_loss"], total, rtol=1e-6)
    else:
        assert float(metrics["attn/gate_lb"]) >= 1.0 - 1e-5  # Switch LB is >= 1, = 1 when balanced


def test_causality_and_kv_cache_greedy_decode_with_gated_heads():
    cfg = dataclasses.replace(heads_config(), max_len=32)
    params = init_params(cfg, jax.random.key(7))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 40, (1, 10)), jnp.int32)
    # Causality: the logits at position 4 do not depend on tokens after it.
    emb = params["embed"]["embedding"]
    grad_emb = jax.jit(jax.grad(lambda e: Transformer(cfg).apply({"params": dict(params, embed={"embedding": e})},
                                                                 tokens)[0][0, 4].sum()))(emb)
    later = set(np.asarray(tokens[0, 5:]).tolist()) - set(np.asarray(tokens[0, :5]).tolist())
    assert later and all(np.all(np.asarray(grad_emb[v]) == 0) for v in later)
    # Greedy decoding with the KV cache equals the full forward's argmax at every new position
    # (one causal forward over prompt + generated tokens checks them all).
    prompt = np.asarray(tokens[0, :5]).tolist()
    new = generate(params, cfg, prompt, max_new_tokens=8)
    logits, _ = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, jnp.asarray([prompt + new]))
    assert new == np.asarray(jnp.argmax(logits[0, 4:-1], -1)).tolist()
