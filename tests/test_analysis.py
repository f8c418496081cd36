"""Routing analysis against hand computations, eagerly and under jit (chex.variants)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.core.analysis import (
    avg_k_from_counts,
    domain_expert_counts,
    domain_loss_sums,
    domain_means,
    domain_token_counts,
    fallback_count,
    gate_accuracy,
    gate_hits,
    nmi_from_counts,
    surprise_target_counts,
)


class TestAnalysisAgainstHandComputations(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_gate_accuracy_counts_only_unmasked_tokens(self):
        accuracy, hits = self.variant(gate_accuracy), self.variant(gate_hits)
        pre = jnp.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.2], [0.3, 0.2, 0.1], [0.0, 0.0, 1.0]])
        s = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        # argmax pre = 0, 1, 0, 2; argmin S = 0, 1, 2, 0 (ties -> first): hits on tokens 0 and 1.
        assert float(accuracy(pre, s)) == 0.5
        mask = jnp.array([1.0, 0.0, 1.0, 0.0])  # tokens 0 (hit) and 2 (miss)
        assert float(accuracy(pre, s, mask)) == 0.5
        assert tuple(map(float, hits(pre, s, jnp.array([0.0, 1.0, 0.0, 0.0])))) == (1.0, 1.0)
        assert float(accuracy(pre, s, jnp.zeros(4))) == 0.0
        assert float(jax.jit(gate_accuracy)(pre, s, mask)) == 0.5

    @chex.variants(with_jit=True, without_jit=True)
    def test_domain_expert_counts_skip_padding_and_masked_tokens(self):
        expert_counts = self.variant(domain_expert_counts, static_argnums=2)
        token_counts = self.variant(domain_token_counts, static_argnums=1)
        avg_k = self.variant(avg_k_from_counts)
        mask = jnp.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1]], bool)
        domain = jnp.array([0, 1, 1, -1])
        counts = expert_counts(mask, domain, 2)
        np.testing.assert_array_equal(counts, [[1, 1, 0], [1, 1, 1]])
        np.testing.assert_array_equal(token_counts(domain, 2), [1, 2])
        token_mask = jnp.array([1.0, 0.0, 1.0, 1.0])
        np.testing.assert_array_equal(expert_counts(mask, domain, 2, token_mask), [[1, 1, 0], [1, 0, 1]])
        np.testing.assert_array_equal(token_counts(domain, 2, token_mask), [1, 1])
        # avg_k: domain 0 has 1 token with 2 experts; domain 1 has 2 tokens with 1 + 2 experts.
        np.testing.assert_allclose(avg_k(counts, token_counts(domain, 2)), [2.0, 1.5])
        assert np.isnan(avg_k(counts, jnp.array([1.0, 0.0]))[1])

    @chex.variants(with_jit=True, without_jit=True)
    def test_nmi_extremes(self):
        nmi = self.variant(nmi_from_counts)
        assert abs(float(nmi(jnp.array([[5.0, 0.0], [0.0, 5.0]]))) - 1.0) < 1e-6
        # The experts partition the domains (I = H(D)) but domain 1 uses two: NMI = sqrt(H(D)/H(E)).
        h = lambda ps: -sum(p * math.log(p) for p in ps)
        got = float(nmi(jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 2.0]])))
        assert abs(got - math.sqrt(h([3 / 7, 4 / 7]) / h([3 / 7, 2 / 7, 2 / 7]))) < 1e-6
        assert abs(float(nmi(jnp.array([[2.0, 2.0], [1.0, 1.0]])))) < 1e-7  # independent
        assert float(nmi(jnp.zeros((2, 3)))) == 0.0
        assert float(nmi(jnp.array([[4.0], [2.0]]))) == 0.0  # one expert: H(E) = 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_nmi_matches_entropy_identity_by_hand(self):
        nmi = self.variant(nmi_from_counts)
        # n = [[2, 1], [0, 1]]: p = [[1/2, 1/4], [0, 1/4]], p(d) = (3/4, 1/4), p(e) = (1/2, 1/2).
        h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
        h_d, h_e, h_de = h([0.75, 0.25]), h([0.5, 0.5]), h([0.5, 0.25, 0.25])
        expected = (h_d + h_e - h_de) / math.sqrt(h_d * h_e)  # I = H(D) + H(E) - H(D, E)
        got = nmi(jnp.array([[2.0, 1.0], [0.0, 1.0]]))
        assert abs(float(got) - expected) < 1e-6
        # Leading axes (layers) are kept.
        per_layer = nmi(jnp.array([[[2.0, 1.0], [0.0, 1.0]], [[5.0, 0.0], [0.0, 5.0]]]))
        np.testing.assert_allclose(per_layer, [expected, 1.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nmi_from_routing_masks_of_a_hand_example(self):
        expert_counts, nmi = self.variant(domain_expert_counts, static_argnums=2), self.variant(nmi_from_counts)
        # Domain 0 tokens use experts {0, 1}, domain 1 tokens expert {1}: n = [[2, 2], [0, 2]].
        mask = jnp.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)
        counts = expert_counts(mask, jnp.array([0, 0, 1, 1]), 2)
        h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
        h_d, h_e, h_de = h([4 / 6, 2 / 6]), h([2 / 6, 4 / 6]), h([2 / 6, 2 / 6, 2 / 6])
        assert abs(float(nmi(counts)) - (h_d + h_e - h_de) / math.sqrt(h_d * h_e)) < 1e-6

    @chex.variants(with_jit=True, without_jit=True)
    def test_domain_loss_sums_and_means(self):
        loss_sums, means_of = self.variant(domain_loss_sums, static_argnums=3), self.variant(domain_means)
        ce = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
        mask = jnp.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
        sums, counts = loss_sums(ce, mask, jnp.array([1, 1, -1]), 3)
        np.testing.assert_allclose(sums, [0.0, 20.0, 0.0])
        np.testing.assert_allclose(counts, [0.0, 5.0, 0.0])
        means = means_of(sums, counts)
        assert np.isnan(means[0]) and np.isnan(means[2]) and float(means[1]) == 4.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_surprise_target_counts_inactive_targets_and_histogram(self):
        target_counts = self.variant(surprise_target_counts)
        s = jnp.array([[0.0, 0.3, 0.0], [0.2, 0.1, 0.5], [0.0, 0.0, 0.0], [0.4, 0.3, 0.9]])
        mask = jnp.array([[0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
        # argmin S = 0 (inactive), 1 (active), 0 (active; g = 0 row), 1 (active).
        inactive, hist = target_counts(s, mask)
        assert float(inactive) == 1.0
        np.testing.assert_array_equal(hist, [2, 2, 0])
        inactive, hist = target_counts(s, mask, jnp.array([1.0, 0.0, 0.0, 1.0]))
        assert float(inactive) == 1.0
        np.testing.assert_array_equal(hist, [1, 1, 0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_fallback_count_counts_tokens_without_an_expert_above_threshold(self):
        fallbacks = self.variant(fallback_count)
        pre = jnp.array([[-0.1, 0.2], [-0.3, -0.1], [0.0, -0.2], [0.5, 0.1]])
        assert float(fallbacks(pre)) == 2.0  # rows 1 and 2 (pre == 0 is not above threshold)
        assert float(fallbacks(pre, jnp.array([1.0, 1.0, 0.0, 1.0]))) == 1.0
