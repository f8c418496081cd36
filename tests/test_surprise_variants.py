"""Surprise variants (advantage, learning cost) against brute-force autodiff on tiny models.

The variant under test runs eagerly and under jit (chex.variants); the model setup and the
brute-force references are computed once (cached) and shared by both variants."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from helpers import random_batch, tiny_config

from onn_jax.core.experts import combine, expert_outputs
from onn_jax.core.losses import next_token_loss
from onn_jax.core.surprise import SurpriseInputs
from onn_jax.core.surprise_variants import (
    VARIANTS,
    advantage_surprise,
    expert_grad_norms,
    learning_cost,
    learning_cost_surprise,
)
from onn_jax.nn.transformer import Transformer, init_params, model_taps


@functools.lru_cache(maxsize=None)  # shared by a test's variants; call it with keywords (one cache key)
def _model_setup(num_layers=1, seed=0, **moe):
    """Params, batch, taps, records, dL/dtaps and the experts' inputs x of every layer."""
    cfg = tiny_config(num_layers=num_layers, **moe)
    params = init_params(cfg, jax.random.key(seed))
    batch = random_batch(seed)
    taps = model_taps(cfg, *batch["inputs"].shape)
    model = Transformer(cfg)
    (_, records), inter = model.apply({"params": params}, batch["inputs"], taps,
                                      capture_intermediates=True, mutable=["intermediates"])
    xs = [inter["intermediates"][f"block_{i}"]["norm_moe"]["__call__"][0].reshape(-1, cfg.hidden)
          for i in range(num_layers)]

    def loss(taps):
        logits, _ = model.apply({"params": params}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    d_taps = jax.jit(jax.grad(loss))(taps)
    return cfg, params, batch, taps, records, d_taps, xs, model


def _inputs(d, r, x=None, p=None):
    return SurpriseInputs(d.expert_out, d.moe_out, r.expert_out, r.router.weights, r.router.mask)


@functools.lru_cache(maxsize=None)
def _mixing_jacobian(num_layers, seed, layer):
    """dL/d eps [N, E] at eps = 0, where out_t -> out_t + sum_e eps[t,e] (Y[t,e] - out_t) in `layer`:
    routing weight moved towards expert e (brute force: the scalar loss's full Jacobian)."""
    _, params, batch, taps, records, _, _, model = _model_setup(num_layers=num_layers, seed=seed)
    r = records[layer]
    y, w = jax.lax.stop_gradient(r.expert_out), jax.lax.stop_gradient(r.router.weights)
    out = jnp.einsum("ne,nec->nc", w, y)

    def loss_of_mix(eps_NxE):
        t = list(taps)
        t[layer] = taps[layer]._replace(moe_out=jnp.einsum("ne,nec->nc", eps_NxE, y - out[:, None]))
        logits, _ = model.apply({"params": params}, batch["inputs"], tuple(t))
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    return jax.jit(jax.grad(loss_of_mix))(jnp.zeros_like(w))


class TestAdvantageAgainstReferences(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.slow  # innermost: the generated variants copy the marked function's attributes
    def test_advantage_equals_jacobian_of_the_loss_wrt_moving_routing_weight_in_the_model(self):
        cfg, _, _, _, records, d_taps, _, _ = _model_setup(num_layers=2, seed=3)
        advantage = self.variant(advantage_surprise)
        for layer in range(cfg.num_layers):
            r = records[layer]
            w = jax.lax.stop_gradient(r.router.weights)
            brute = _mixing_jacobian(2, 3, layer)
            a = advantage(_inputs(d_taps[layer], r))
            np.testing.assert_allclose(a, brute, rtol=1e-5, atol=1e-9)
            # Defined for inactive experts (unlike the faithful S, which is 0 there) ...
            inactive = ~np.asarray(r.router.mask)
            assert inactive.any() and np.any(np.abs(np.asarray(a)[inactive]) > 0)
            # ... and the current mixture has zero advantage: sum_e w[t,e] A[t,e] = <g, out - out> = 0.
            np.testing.assert_allclose(jnp.sum(w * a, -1), 0.0, atol=1e-7)
        # Top layer: a position whose label is masked has g_t = 0, so A[t, :] = 0 for every expert.
        a_top = np.asarray(advantage(_inputs(d_taps[-1], records[-1]))).reshape(2, 8, -1)
        assert np.all(a_top[:, :3] == 0) and np.any(a_top[:, 3:] != 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_advantage_matches_finite_difference_of_a_reweighted_standalone_moe(self):
        rng = np.random.default_rng(0)
        n, c, e, i, v = 5, 6, 4, 8, 7
        p = {"w1": jnp.asarray(rng.normal(size=(e, c, i)), jnp.float32) / 3,
             "w2": jnp.asarray(rng.normal(size=(e, i, c)), jnp.float32) / 3}
        x = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
        head = jnp.asarray(rng.normal(size=(c, v)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, v, n))
        w = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), -1)
        y = expert_outputs(p, x)
        ce = lambda logits: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        loss = jax.jit(lambda weights: ce(combine(weights, y) @ head))
        g = jax.grad(lambda o: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o @ head, labels)))(
            combine(w, y))
        a = np.asarray(self.variant(advantage_surprise)(SurpriseInputs(w[..., None] * g[:, None], g, y, w, w > 0)))
        h = 1e-3
        for t, k in [(0, 0), (2, 3), (4, 1)]:
            move = jnp.zeros_like(w).at[t].set(jax.nn.one_hot(k, e) - w[t])
            fd = (loss(w + h * move) - loss(w - h * move)) / (2 * h)
            np.testing.assert_allclose(a[t, k], fd, rtol=1e-2, atol=1e-5)


def _brute_per_token_grad_norms(expert_params, x_NxC, g_NxC, kind):
    """For each token t: jax.grad of <g_t, Y(x_t)> w.r.t. the stacked expert weights, then the
    norm of each expert's slice (expert e's weights only reach Y[t, e])."""
    def one(x_C, g_C):
        grads = jax.grad(lambda p: jnp.sum(expert_outputs(p, x_C[None], kind)[0] * g_C[None]))(expert_params)
        return grads, jnp.sqrt(sum(jnp.sum(jnp.square(gr), axis=(1, 2)) for gr in grads.values()))
    return jax.vmap(one)(x_NxC, g_NxC)


@functools.lru_cache(maxsize=None)
def _learning_cost_references(kind, layer):
    """Brute force for layer `layer` of _model_setup(num_layers=2, seed=1, expert_kind=kind):
    (per-token gradients of <g_t, Y(x_t)> w.r.t. the stacked expert weights, their per-expert
    norms [N, E], and the true gradient of the main loss w.r.t. the layer's expert weights)."""
    _, params, batch, taps, _, d_taps, xs, model = _model_setup(num_layers=2, seed=1, expert_kind=kind)
    ep = params[f"block_{layer}"]["moe"]["experts"]
    per_token, brute = _brute_per_token_grad_norms(ep, xs[layer], d_taps[layer].moe_out, kind)
    true = jax.jit(jax.grad(lambda ep_: _loss_with_experts(model, params, batch, taps, layer, ep_)))(ep)
    return per_token, brute, true


class TestLearningCostAgainstBruteForce(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("gelu", "gelu"), ("swiglu", "swiglu"))
    @pytest.mark.slow  # innermost: the generated variants copy the marked function's attributes
    def test_learning_cost_equals_brute_force_per_token_parameter_gradient_norm(self, kind):
        cfg, params, _, _, records, d_taps, xs, _ = _model_setup(num_layers=2, seed=1, expert_kind=kind)
        cost = self.variant(learning_cost)
        norms = self.variant(expert_grad_norms)
        # Via the optional SurpriseInputs fields, as the registry calls it.
        ext = lambda g_, x_, p_: type("Ext", (), dict(d_moe_out=g_, expert_in=x_, expert_params=p_))()
        cost_surprise = self.variant(lambda g_, x_, p_: learning_cost_surprise(ext(g_, x_, p_)))
        for layer in range(cfg.num_layers):
            ep = params[f"block_{layer}"]["moe"]["experts"]
            g = d_taps[layer].moe_out
            per_token, brute, true = _learning_cost_references(kind, layer)
            inp = _inputs(d_taps[layer], records[layer])
            lc = cost(inp, xs[layer], ep)
            np.testing.assert_allclose(lc, brute, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(lc, norms(ep, xs[layer], g), rtol=0, atol=0)
            np.testing.assert_allclose(cost_surprise(g, xs[layer], ep), lc, rtol=0, atol=0)
            # Unweighted: the true gradient of the main loss w.r.t. the expert weights is the
            # w[t,e]-weighted sum of these per-token gradients, for all experts including inactive ones.
            w = records[layer].router.weights
            summed = jax.tree.map(lambda pt: jnp.einsum("ne,ne...->e...", w, pt), per_token)
            chex.assert_trees_all_close(summed, true, rtol=1e-4, atol=1e-7)
            assert np.all(np.asarray(lc)[~np.asarray(records[layer].router.mask)] > 0) or layer == cfg.num_layers - 1


def _loss_with_experts(model, params, batch, taps, layer, expert_params):
    p = jax.tree.map(lambda a: a, params)
    p[f"block_{layer}"]["moe"]["experts"] = expert_params
    logits, _ = model.apply({"params": p}, batch["inputs"], taps)
    return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]


def test_learning_cost_is_zero_for_masked_top_layer_tokens_and_needs_its_inputs():
    cfg, params, batch, taps, records, d_taps, xs, _ = _model_setup(num_layers=1, seed=2)
    inp = _inputs(d_taps[0], records[0])
    lc = np.asarray(learning_cost(inp, xs[0], params["block_0"]["moe"]["experts"])).reshape(2, 8, -1)
    assert np.all(lc[:, :3] == 0) and np.all(lc[:, 3:] > 0)
    with pytest.raises(ValueError, match="expert_in"):
        learning_cost_surprise(inp)
    assert VARIANTS == {"advantage": advantage_surprise, "learning_cost": learning_cost_surprise}
