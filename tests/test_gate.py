"""Top-any gate: threshold semantics, fallback, weights, and where gradients flow.

The comparisons with an independent reference (NumPy, closed forms) run eagerly and under jit
(chex.variants), so the router's math and its entry contracts hold for tracers too."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from onn_jax.core.gate import cosine_logits, masked_softmax, top_any_gate, topk_gate


def numpy_gate(x, protos, theta, fallback_k):
    """Independent NumPy reference of the gate of docs/ALGORITHM.md."""
    xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    pn = protos / np.maximum(np.linalg.norm(protos, axis=0, keepdims=True), 1e-12)
    logits = xn @ pn
    pre = logits - 1.0 / (1.0 + np.exp(-theta))
    gated = np.maximum(pre, 0.0)
    mask = gated > 0
    for t in range(x.shape[0]):
        if not mask[t].any():
            mask[t, np.argsort(-logits[t])[:fallback_k]] = True
    w = np.where(mask, np.exp(gated), 0.0)
    return logits, pre, mask, w / w.sum(-1, keepdims=True)


class TestGateAgainstReferences(chex.TestCase):
    """The gate against NumPy and closed forms, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_gate_matches_numpy_reference(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 12)).astype(np.float32)
        protos = rng.normal(size=(12, 8)).astype(np.float32)
        theta = rng.normal(size=(8,)).astype(np.float32)
        gate = self.variant(top_any_gate, static_argnames="fallback_k")
        out = gate(jnp.asarray(x), jnp.asarray(protos), jnp.asarray(theta), fallback_k=3)
        logits, pre, mask, w = numpy_gate(x.astype(np.float64), protos.astype(np.float64),
                                          theta.astype(np.float64), 3)
        np.testing.assert_allclose(out.logits, logits, atol=1e-6)
        np.testing.assert_allclose(out.pre, pre, atol=1e-6)
        np.testing.assert_array_equal(out.mask, mask)
        np.testing.assert_allclose(out.weights, w, atol=1e-6)
        assert 0 < mask.sum(-1).min() and mask.any(-1).all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_threshold_semantics_active_iff_logit_exceeds_sigmoid_theta(self):
        # Prototypes = the unit basis, so logits are the normalised coordinates of x.
        protos = jnp.eye(4)
        x = jnp.array([[0.9, 0.1, 0.3, 0.0]])
        logits = np.asarray(self.variant(cosine_logits)(x, protos))[0]
        theta = jnp.array([0.0, 0.0, 5.0, -5.0])  # thresholds 0.5, 0.5, ~0.993, ~0.0067
        out = self.variant(top_any_gate, static_argnames="fallback_k")(x, protos, theta, fallback_k=2)
        expected = logits > 1.0 / (1.0 + np.exp(-np.asarray(theta)))
        np.testing.assert_array_equal(np.asarray(out.mask)[0], expected)
        assert expected.tolist() == [True, False, False, False]  # 3rd under its high threshold; 4th has logit 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_fallback_activates_exactly_top_fallback_k_by_logits_with_equal_weights(self):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
        protos = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
        theta = jnp.full((10,), 20.0)  # threshold ~1: nothing passes, every token falls back
        gate = self.variant(top_any_gate, static_argnames="fallback_k")
        for k in (1, 3, 5):
            out = gate(x, protos, theta, fallback_k=k)
            np.testing.assert_array_equal(np.asarray(out.mask).sum(-1), k)
            top = np.argsort(-np.asarray(out.logits), axis=-1)[:, :k]
            for t in range(16):
                assert set(np.flatnonzero(out.mask[t])) == set(top[t])
            np.testing.assert_allclose(np.asarray(out.weights)[np.asarray(out.mask)], 1.0 / k, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_fallback_for_tokens_with_an_active_expert(self):
        protos = jnp.eye(3)
        x = jnp.array([[1.0, 0.0, 0.0], [0.1, 0.1, 0.1]])  # first token has logit 1 on expert 0
        out = self.variant(top_any_gate, static_argnames="fallback_k")(x, protos, jnp.zeros(3), fallback_k=2)
        assert np.asarray(out.mask)[0].tolist() == [True, False, False]
        assert np.asarray(out.mask)[1].sum() == 3  # logits 0.577 > 0.5: all three pass, no fallback
        np.testing.assert_allclose(out.weights[0], [1.0, 0.0, 0.0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_softmax_is_softmax_on_the_mask(self):
        s = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 9.0]])
        m = jnp.array([[True, False, True], [False, True, False]])
        w = self.variant(masked_softmax)(s, m)
        np.testing.assert_allclose(w[0], np.array([np.e ** 1, 0, np.e ** 3]) / (np.e ** 1 + np.e ** 3), rtol=1e-6)
        np.testing.assert_allclose(w[1], [0.0, 1.0, 0.0])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("k1", 1), ("k2", 2), ("k4", 4))
    def test_topk_gate_selects_k_and_renormalises(self, k):
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
        w_router = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
        out = self.variant(topk_gate, static_argnames="k")(x, w_router, k=k)
        np.testing.assert_array_equal(np.asarray(out.mask).sum(-1), k)
        probs = np.asarray(jax.nn.softmax(x @ w_router))
        sel = np.where(np.asarray(out.mask), probs, 0.0)
        np.testing.assert_allclose(out.weights, sel / sel.sum(-1, keepdims=True), rtol=1e-5)


def test_weights_sum_to_one_and_vanish_off_mask():
    rng = np.random.default_rng(2)
    out = top_any_gate(jnp.asarray(rng.normal(size=(128, 8)), jnp.float32),
                       jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                       jnp.asarray(rng.normal(size=(16,)), jnp.float32), fallback_k=8)
    np.testing.assert_allclose(np.asarray(out.weights).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(out.weights)[~np.asarray(out.mask)] == 0.0)
    assert np.all(np.asarray(out.weights)[np.asarray(out.mask)] > 0.0)


def test_gradients_reach_prototypes_and_thresholds_through_weights():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    protos = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    theta = jnp.full((5,), -1.0)  # low thresholds: several active experts per token
    c = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    loss = lambda p, th: jnp.sum(top_any_gate(x, p, th, 2).weights * c)
    gp, gt = jax.grad(loss, argnums=(0, 1))(protos, theta)
    assert float(jnp.abs(gp).max()) > 0 and float(jnp.abs(gt).max()) > 0


def test_fallback_weights_carry_no_gradient():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)), jnp.float32)
    loss = lambda th: jnp.sum(top_any_gate(x, jnp.eye(3), th, 2).weights * jnp.arange(3.0))
    assert float(jnp.abs(jax.grad(loss)(jnp.full((3,), 20.0))).max()) == 0.0


def test_zero_token_has_finite_gradients():
    x = jnp.zeros((2, 4)).at[1].set(jnp.array([1.0, 2.0, 0.0, -1.0]))
    protos = jnp.asarray(np.random.default_rng(6).normal(size=(4, 3)), jnp.float32)
    loss = lambda x_, p_: jnp.sum(top_any_gate(x_, p_, jnp.zeros(3), 1).pre ** 2)
    gx, gp = jax.grad(loss, argnums=(0, 1))(x, protos)
    assert bool(jnp.all(jnp.isfinite(gx))) and bool(jnp.all(jnp.isfinite(gp)))
    np.testing.assert_allclose(cosine_logits(x, protos)[0], 0.0)
