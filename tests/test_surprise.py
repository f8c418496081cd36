"""Surprise: the closed form S = w * |dL/dout|, zero on inactive experts, and brute-force autodiff.

The surprise function runs eagerly and under jit (chex.variants); the model's forward values and
tap cotangents it reads are computed once per setup (cached) and shared by both variants."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_batch, tiny_config

from onn_jax.core.losses import next_token_loss
from onn_jax.core.surprise import SurpriseInputs, output_grad_surprise
from onn_jax.nn.transformer import Transformer, init_params, model_taps


def _loss_of_taps(cfg, params, batch):
    model = Transformer(cfg)

    def loss(taps):
        logits, _ = model.apply({"params": params}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]
    return loss


@functools.lru_cache(maxsize=None)  # shared by a test's variants; call it with keywords (one cache key)
def _setup(num_layers=2, seed=0):
    cfg = tiny_config(num_layers=num_layers)
    params = init_params(cfg, jax.random.key(seed))
    batch = random_batch(seed)
    taps = model_taps(cfg, *batch["inputs"].shape)
    _, records = Transformer(cfg).apply({"params": params}, batch["inputs"], taps)
    return cfg, params, batch, taps, records


@functools.lru_cache(maxsize=None)
def _tap_grads(num_layers, seed):
    """dL/dtaps of the main loss at _setup(num_layers, seed)."""
    cfg, params, batch, taps, _ = _setup(num_layers=num_layers, seed=seed)
    return jax.grad(_loss_of_taps(cfg, params, batch))(taps)


class TestSurpriseAgainstReferences(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_surprise_equals_weight_times_output_gradient_norm_and_vanishes_when_inactive(self):
        cfg, params, batch, taps, records = _setup(num_layers=2, seed=0)
        d_taps = _tap_grads(2, 0)
        surprise = self.variant(output_grad_surprise)
        for layer, (d, r) in enumerate(zip(d_taps, records)):
            s = surprise(SurpriseInputs(d.expert_out, d.moe_out, r.expert_out, r.router.weights, r.router.mask))
            closed = r.router.weights * jnp.linalg.norm(d.moe_out, axis=-1)[:, None]
            np.testing.assert_allclose(s, closed, rtol=1e-5, atol=1e-10)
            assert np.all(np.asarray(s)[~np.asarray(r.router.mask)] == 0.0)
            assert np.all(np.asarray(s)[np.asarray(r.router.mask)] >= 0.0)
            s_BxTxE = np.asarray(s).reshape(2, 8, -1)
            if layer == cfg.num_layers - 1:
                # In the top layer a position reaches the loss only through its own label, so
                # masked prompt positions have zero surprise for every expert.
                assert np.all(s_BxTxE[:, :3] == 0.0) and np.any(s_BxTxE[:, 3:] > 0)
            else:
                # Lower layers reach later labels through attention: prompt positions are surprised.
                assert np.any(s_BxTxE[:, :3] > 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_surprise_equals_brute_force_jacobian_of_the_loss_wrt_the_expert_output(self):
        cfg, params, batch, taps, records = _setup(num_layers=1, seed=1)
        model = Transformer(cfg)
        y0 = records[0].expert_out

        def loss_of_y(y_NxExC):
            # Replace the layer's dense expert output by y via the tap: tap = y - Y(params).
            t = (taps[0]._replace(expert_out=y_NxExC - jax.lax.stop_gradient(y0)),)
            logits, _ = model.apply({"params": params}, batch["inputs"], t)
            return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

        jac = jax.jacrev(loss_of_y)(y0)  # [N, E, C], a full reverse-mode Jacobian of the scalar loss
        s_brute = np.sqrt((np.asarray(jac, np.float64) ** 2).sum(-1))
        d_taps = _tap_grads(1, 1)
        s = self.variant(output_grad_surprise)(SurpriseInputs(d_taps[0].expert_out, d_taps[0].moe_out, y0,
                                                               records[0].router.weights, records[0].router.mask))
        np.testing.assert_allclose(s, s_brute, rtol=1e-5, atol=1e-9)


def test_surprise_matches_finite_differences_of_the_loss():
    cfg, params, batch, taps, records = _setup(num_layers=1, seed=2)
    loss = _loss_of_taps(cfg, params, batch)
    d = jax.grad(loss)(taps)[0].expert_out
    mask = np.asarray(records[0].router.mask)
    t, e = np.argwhere(mask)[5]
    eps = 1e-2
    for c in range(3):
        bump = jnp.zeros_like(taps[0].expert_out).at[t, e, c].set(eps)
        plus = loss((taps[0]._replace(expert_out=bump),))
        minus = loss((taps[0]._replace(expert_out=-bump),))
        np.testing.assert_allclose((plus - minus) / (2 * eps), d[t, e, c], rtol=2e-2, atol=1e-6)
