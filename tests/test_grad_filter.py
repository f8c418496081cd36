"""The 2-sigma expert gradient filter against NumPy statistics."""
import jax.numpy as jnp
import numpy as np
import pytest

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


def apply_filter(tree, **kw):
    tx = sigma_filter(**kw)
    out, state = tx.update(jax_tree(tree), tx.init(tree))
    return out, state


def jax_tree(tree):
    import jax
    return jax.tree.map(jnp.asarray, tree)


def check_non_expert_untouched(tree, out):
    for a, b in [(tree["block_0"]["moe"]["prototypes"], out["block_0"]["moe"]["prototypes"]),
                 (tree["block_0"]["attn"]["kernel"], out["block_0"]["attn"]["kernel"]),
                 (tree["embed"]["embedding"], out["embed"]["embedding"])]:
        np.testing.assert_array_equal(a, b)


def test_pooled_one_sided_is_faithful():
    tree = grads_tree()
    out, state = apply_filter(tree)
    pooled = np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)])
    thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
    dropped = 0
    for before, after in zip(expert_leaves(tree), expert_leaves(out)):
        expected = np.where(before > thr, 0.0, before)
        np.testing.assert_array_equal(after, expected)
        dropped += int((before > thr).sum())
    assert dropped > 0, "the fixture must contain outliers"
    assert any((x < -thr).any() for x in expert_leaves(tree)), "negative outliers must survive"
    check_non_expert_untouched(tree, out)
    np.testing.assert_allclose(state.zeroed_fraction, dropped / pooled.size, rtol=1e-6)


def test_two_sided_filters_large_magnitudes_of_both_signs():
    tree = grads_tree(1)
    out, _ = apply_filter(tree, mode="two_sided")
    pooled = np.abs(np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)]))
    thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
    for before, after in zip(expert_leaves(tree), expert_leaves(out)):
        np.testing.assert_array_equal(after, np.where(np.abs(before) > thr, 0.0, before))
    assert any((x < -thr).any() for x in expert_leaves(tree))
    check_non_expert_untouched(tree, out)


def test_per_layer_uses_each_blocks_own_statistics():
    tree = grads_tree(2)
    out, _ = apply_filter(tree, scope="per_layer")
    leaves_in, leaves_out = expert_leaves(tree), expert_leaves(out)
    for layer in (slice(0, 2), slice(2, 4)):
        pooled = np.concatenate([x.ravel().astype(np.float64) for x in leaves_in[layer]])
        thr = pooled.mean() + 2.0 * pooled.std(ddof=1)
        for before, after in zip(leaves_in[layer], leaves_out[layer]):
            np.testing.assert_array_equal(after, np.where(before > thr, 0.0, before))
    pooled_out, _ = apply_filter(tree)
    assert not all(np.array_equal(a, b) for a, b in zip(expert_leaves(pooled_out), leaves_out))


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_sigma_is_honoured(sigma):
    tree = grads_tree(3)
    out, _ = apply_filter(tree, sigma=sigma)
    pooled = np.concatenate([x.ravel().astype(np.float64) for x in expert_leaves(tree)])
    thr = pooled.mean() + sigma * pooled.std(ddof=1)
    for before, after in zip(expert_leaves(tree), expert_leaves(out)):
        np.testing.assert_array_equal(after, np.where(before > thr, 0.0, before))


def test_off_is_the_identity():
    tree = grads_tree(4)
    out, _ = apply_filter(tree, mode="off")
    for a, b in zip(expert_leaves(tree), expert_leaves(out)):
        np.testing.assert_array_equal(a, b)
