"""Routing analysis against hand computations."""
import math

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


def test_gate_accuracy_counts_only_unmasked_tokens():
    pre = jnp.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.2], [0.3, 0.2, 0.1], [0.0, 0.0, 1.0]])
    s = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # argmax pre = 0, 1, 0, 2; argmin S = 0, 1, 2, 0 (ties -> first): hits on tokens 0 and 1.
    assert float(gate_accuracy(pre, s)) == 0.5
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])  # tokens 0 (hit) and 2 (miss)
    assert float(gate_accuracy(pre, s, mask)) == 0.5
    assert tuple(map(float, gate_hits(pre, s, jnp.array([0.0, 1.0, 0.0, 0.0])))) == (1.0, 1.0)
    assert float(gate_accuracy(pre, s, jnp.zeros(4))) == 0.0
    assert float(jax.jit(gate_accuracy)(pre, s, mask)) == 0.5


def test_domain_expert_counts_skip_padding_and_masked_tokens():
    mask = jnp.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1]], bool)
    domain = jnp.array([0, 1, 1, -1])
    counts = domain_expert_counts(mask, domain, 2)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(domain_token_counts(domain, 2), [1, 2])
    token_mask = jnp.array([1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(domain_expert_counts(mask, domain, 2, token_mask), [[1, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(domain_token_counts(domain, 2, token_mask), [1, 1])
    # avg_k: domain 0 has 1 token with 2 experts; domain 1 has 2 tokens with 1 + 2 experts.
    np.testing.assert_allclose(avg_k_from_counts(counts, domain_token_counts(domain, 2)), [2.0, 1.5])
    assert np.isnan(avg_k_from_counts(counts, jnp.array([1.0, 0.0]))[1])


def test_nmi_extremes():
    assert abs(float(nmi_from_counts(jnp.array([[5.0, 0.0], [0.0, 5.0]]))) - 1.0) < 1e-6
    # The experts partition the domains (I = H(D)) but domain 1 uses two: NMI = sqrt(H(D)/H(E)).
    h = lambda ps: -sum(p * math.log(p) for p in ps)
    got = float(nmi_from_counts(jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 2.0]])))
    assert abs(got - math.sqrt(h([3 / 7, 4 / 7]) / h([3 / 7, 2 / 7, 2 / 7]))) < 1e-6
    assert abs(float(nmi_from_counts(jnp.array([[2.0, 2.0], [1.0, 1.0]])))) < 1e-7  # independent
    assert float(nmi_from_counts(jnp.zeros((2, 3)))) == 0.0
    assert float(nmi_from_counts(jnp.array([[4.0], [2.0]]))) == 0.0  # one expert: H(E) = 0


def test_nmi_matches_entropy_identity_by_hand():
    # n = [[2, 1], [0, 1]]: p = [[1/2, 1/4], [0, 1/4]], p(d) = (3/4, 1/4), p(e) = (1/2, 1/2).
    h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
    h_d, h_e, h_de = h([0.75, 0.25]), h([0.5, 0.5]), h([0.5, 0.25, 0.25])
    expected = (h_d + h_e - h_de) / math.sqrt(h_d * h_e)  # I = H(D) + H(E) - H(D, E)
    got = nmi_from_counts(jnp.array([[2.0, 1.0], [0.0, 1.0]]))
    assert abs(float(got) - expected) < 1e-6
    # Leading axes (layers) are kept.
    per_layer = nmi_from_counts(jnp.array([[[2.0, 1.0], [0.0, 1.0]], [[5.0, 0.0], [0.0, 5.0]]]))
    np.testing.assert_allclose(per_layer, [expected, 1.0], rtol=1e-6)


def test_nmi_from_routing_masks_of_a_hand_example():
    # Domain 0 tokens use experts {0, 1}, domain 1 tokens expert {1}: n = [[2, 2], [0, 2]].
    mask = jnp.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)
    counts = domain_expert_counts(mask, jnp.array([0, 0, 1, 1]), 2)
    h = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
    h_d, h_e, h_de = h([4 / 6, 2 / 6]), h([2 / 6, 4 / 6]), h([2 / 6, 2 / 6, 2 / 6])
    assert abs(float(nmi_from_counts(counts)) - (h_d + h_e - h_de) / math.sqrt(h_d * h_e)) < 1e-6


def test_domain_loss_sums_and_means():
    ce = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = jnp.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    sums, counts = domain_loss_sums(ce, mask, jnp.array([1, 1, -1]), 3)
    np.testing.assert_allclose(sums, [0.0, 20.0, 0.0])
    np.testing.assert_allclose(counts, [0.0, 5.0, 0.0])
    means = domain_means(sums, counts)
    assert np.isnan(means[0]) and np.isnan(means[2]) and float(means[1]) == 4.0


def test_surprise_target_counts_inactive_targets_and_histogram():
    s = jnp.array([[0.0, 0.3, 0.0], [0.2, 0.1, 0.5], [0.0, 0.0, 0.0], [0.4, 0.3, 0.9]])
    mask = jnp.array([[0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
    # argmin S = 0 (inactive), 1 (active), 0 (active; g = 0 row), 1 (active).
    inactive, hist = surprise_target_counts(s, mask)
    assert float(inactive) == 1.0
    np.testing.assert_array_equal(hist, [2, 2, 0])
    inactive, hist = surprise_target_counts(s, mask, jnp.array([1.0, 0.0, 0.0, 1.0]))
    assert float(inactive) == 1.0
    np.testing.assert_array_equal(hist, [1, 1, 0])


def test_fallback_count_counts_tokens_without_an_expert_above_threshold():
    pre = jnp.array([[-0.1, 0.2], [-0.3, -0.1], [0.0, -0.2], [0.5, 0.1]])
    assert float(fallback_count(pre)) == 2.0  # rows 1 and 2 (pre == 0 is not above threshold)
    assert float(fallback_count(pre, jnp.array([1.0, 1.0, 0.0, 1.0]))) == 1.0
