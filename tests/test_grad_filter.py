"""The 2-sigma expert gradient filter against NumPy statistics, eagerly and under jit (chex.variants)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from onn_jax.core.grad_filter import sigma_filter


def grads_tree(seed=0):
    rng = np.random.default_rng(seed)
    heavy = lambda *s: rng.standard_t(2.0, size=s).astype(np.float32)  # heavy tails: outliers exist
    return {
        "block_0": {"moe": {"experts": {"w1": heavy(4, 6, 5), "w2": heavy(4, 5, 6)},
                            "prototypes": 100.0 * heavy(6, 4)},
                    "attn": {"kernel": 100.0 * heavy(6, 6)}},
        "block_1": {"moe": {"experts": {"w1": 3.0 * heavy(4, 6, 5), "w2": 3.0 * heavy(4, 5, 6)}}},
        "embed": {"embedding": 100.0 * heavy(10, 6)},
    }


def expert_leaves(tree):
    return [tree["block_0"]["moe"]["experts"]["w1"], tree["block_0"]["moe"]["experts"]["w2"],
            tree["block_1"]["moe"]["experts"]["w1"], tree["block_1"]["moe"]["experts"]["w2"]]


def non_expert_leaves(tree):
    return [tree["block_0"]["moe"]["prototypes"], tree["block_0"]["attn"]["kernel"], tree["embed"]["embedding"]]


def apply_filter(tree, variant=lambda fn: fn, **kw):
    """The filter's update on `tree` (through `variant`: as is, or chex's jit / no-jit wrapper)."""
    tx = sigma_filter(**kw)
    out, state = variant(tx.update)(jax_tree(tree), tx.init(tree))
    return out, state


def jax_tree(tree):
    return jax.tree.map(jnp.asarray, tree)


def check_non_expert_untouched(tree, out):
    chex.assert_trees_all_equal(non_expert_leaves(out), non_expert_leaves(tree))


def zeroed_above(leaves, thr, magnitude=False):
    """Each leaf with its entries above thr (|entry| when magnitude) set to 0, in NumPy."""
    return [np.where((np.abs(x) if magnitude else x) > thr, 0.0, x) for x in leaves]


class TestSigmaFilterAgainstNumPy(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_pooled_one_sided_is_faithful(self):
        tree = grads_tree()
        out, state = apply_filter(tree, self.variant)
        pooled = np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)])
        thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
        chex.assert_trees_all_equal(expert_leaves(out), zeroed_above(expert_leaves(tree), thr))
        dropped = sum(int((before > thr).sum()) for before in expert_leaves(tree))
        assert dropped > 0, "the fixture must contain outliers"
        assert any((x < -thr).any() for x in expert_leaves(tree)), "negative outliers must survive"
        check_non_expert_untouched(tree, out)
        np.testing.assert_allclose(state.zeroed_fraction, dropped / pooled.size, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_two_sided_filters_large_magnitudes_of_both_signs(self):
        tree = grads_tree(1)
        out, _ = apply_filter(tree, self.variant, mode="two_sided")
        pooled = np.abs(np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)]))
        thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
        chex.assert_trees_all_equal(expert_leaves(out), zeroed_above(expert_leaves(tree), thr, magnitude=True))
        assert any((x < -thr).any() for x in expert_leaves(tree))
        check_non_expert_untouched(tree, out)

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_layer_uses_each_blocks_own_statistics(self):
        tree = grads_tree(2)
        out, _ = apply_filter(tree, self.variant, scope="per_layer")
        leaves_in, leaves_out = expert_leaves(tree), expert_leaves(out)
        for layer in (slice(0, 2), slice(2, 4)):
            pooled = np.concatenate([x.ravel().astype(np.float64) for x in leaves_in[layer]])
            thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
            chex.assert_trees_all_equal(leaves_out[layer], zeroed_above(leaves_in[layer], thr))
        pooled_out, _ = apply_filter(tree, self.variant)
        assert not all(np.array_equal(a, b) for a, b in zip(expert_leaves(pooled_out), leaves_out))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("sigma1", 1.0), ("sigma3", 3.0))
    def test_sigma_is_honoured(self, sigma):
        tree = grads_tree(3)
        out, _ = apply_filter(tree, self.variant, sigma=sigma)
        pooled = np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)])
        thr = pooled.mean() + sigma * pooled.std(ddof=1)
        chex.assert_trees_all_equal(expert_leaves(out), zeroed_above(expert_leaves(tree), thr))

    @chex.variants(with_jit=True, without_jit=True)
    def test_off_is_the_identity(self):
        tree = grads_tree(4)
        out, _ = apply_filter(tree, self.variant, mode="off")
        chex.assert_trees_all_equal(expert_leaves(out), expert_leaves(tree))
