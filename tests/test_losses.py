"""Loss functions against hand computations, eagerly and under jit (chex.variants)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.core.losses import hybrid_gate_loss, load_balancing_loss, next_token_loss, router_z_loss


class TestLossesAgainstHandComputations(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hybrid_gate_loss_on_a_hand_computed_three_token_example(self):
        pre = np.array([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2], [-0.5, 0.1, 0.1]])
        s = np.array([[0.3, 0.0, 0.1], [0.2, 0.5, 0.05], [0.0, 0.0, 0.4]])
        # Hand computation, written out per token.
        ce_tokens, kl_tokens = [], []
        for t in range(3):
            q = [math.exp(v) for v in pre[t]]
            q = [v / sum(q) for v in q]
            p = [math.exp(-v) for v in s[t]]
            p = [v / sum(p) for v in p]
            target = int(np.argmin(s[t]))  # ties -> lowest index (token 3: expert 0)
            ce_tokens.append(-math.log(q[target]))
            kl_tokens.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        ce, kl = sum(ce_tokens) / 3, sum(kl_tokens) / 3
        gate_loss = self.variant(hybrid_gate_loss)
        loss, parts = gate_loss(jnp.asarray(pre, jnp.float32), jnp.asarray(s, jnp.float32), 1.0, 1.0)
        np.testing.assert_allclose(parts["ce"], ce, rtol=1e-6)
        np.testing.assert_allclose(parts["kl"], kl, rtol=1e-5)
        np.testing.assert_allclose(loss, ce + kl, rtol=1e-6)
        loss2, _ = gate_loss(jnp.asarray(pre, jnp.float32), jnp.asarray(s, jnp.float32), 0.3, 2.0)
        np.testing.assert_allclose(loss2, 0.3 * ce + 2.0 * kl, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hybrid_gate_loss_treats_surprise_as_constant_and_honours_token_mask(self):
        pre = jnp.array([[0.2, -0.1], [0.3, 0.0]])
        s = jnp.array([[0.1, 0.2], [0.4, 0.3]])
        gate_loss = self.variant(hybrid_gate_loss)
        g = self.variant(jax.grad(lambda s_: hybrid_gate_loss(pre, s_)[0]))(s)
        assert float(jnp.abs(g).max()) == 0.0
        only_first, _ = gate_loss(pre, s, token_mask_N=jnp.array([1.0, 0.0]))
        first, _ = gate_loss(pre[:1], s[:1])
        np.testing.assert_allclose(only_first, first, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_next_token_loss_is_the_mean_over_unmasked_positions(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
        targets = rng.integers(0, 7, size=(2, 5))
        mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        loss, acc, count = self.variant(next_token_loss)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
        np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-6)
        np.testing.assert_allclose(acc, ((logits.argmax(-1) == targets) * mask).sum() / mask.sum(), rtol=1e-6)
        assert float(count) == 5.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed(self):
        e = 4
        lb = self.variant(load_balancing_loss)
        balanced_mask = jnp.eye(e, dtype=bool)
        np.testing.assert_allclose(lb(jnp.zeros((e, e)), balanced_mask), 1.0, rtol=1e-6)
        skewed = lb(jnp.tile(jnp.array([[5.0, 0, 0, 0]]), (e, 1)),
                    jnp.tile(jnp.array([[True, False, False, False]]), (e, 1)))
        assert float(skewed) > 3.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_router_z_loss(self):
        logits = jnp.array([[0.0, 0.0], [1.0, 2.0]])
        z = np.log([2.0, np.e + np.e ** 2])
        np.testing.assert_allclose(self.variant(router_z_loss)(logits), np.mean(z ** 2), rtol=1e-6)
