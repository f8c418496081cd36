"""Routing analysis as pure, jittable functions: gate accuracy, expert<->domain mutual
information, avg_k and loss per domain.

Per-batch functions return *sums* (so batches aggregate by addition); the `*_from_*`
functions turn the summed counts into the final metrics.

Expert<->domain normalised mutual information. Over the (token, active expert) pairs of
one MoE layer, let n[d, e] count the pairs whose token comes from domain d and whose expert
is e, p(d, e) = n[d, e] / sum n, p(d) and p(e) its marginals. Then (natural log; the base
cancels)
    I(E; D) = sum_{d,e} p(d,e) log( p(d,e) / (p(d) p(e)) ),   H(X) = -sum_x p(x) log p(x),
    NMI     = I(E; D) / sqrt(H(E) H(D))   in [0, 1]   (0 when H(E) or H(D) is 0).
NMI = 1 only for a one-to-one map between domains and experts. When the experts merely
partition the domains (each expert serves one domain, a domain may use several), I = H(D)
is maximal and NMI = sqrt(H(D)/H(E)). NMI = 0 when every domain uses the experts in the
same proportions. A token with k active experts contributes k
pairs, so domains routed to more experts weigh more in p(d).

Entry contracts (onn_jax.core.contracts): per-token tables are [N, E] (pre and S floating),
per-token vectors (masks, domains) [N] of the same N, domains integer.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from onn_jax.core.contracts import check_per_token, check_scores


def _check_pre_and_surprise(fn: str, pre_NxE: jax.Array, surprise_NxE: jax.Array) -> None:
    check_scores(fn, "pre_NxE", pre_NxE)
    check_scores(fn, "surprise_NxE", surprise_NxE)
    chex.assert_equal_shape([pre_NxE, surprise_NxE], custom_message=f"{fn}: surprise_NxE must be [N, E] like pre_NxE")


def _check_domains(fn: str, name: str, domain: jax.Array, n: int | None, dim: str = "N") -> None:
    """domain is an integer [n] ([N] of any N when n is None)."""
    size = "" if n is None else f", {dim} = {n}"
    chex.assert_shape(domain, (n,), custom_message=f"{fn}: {name} must be [{dim}]{size}")
    chex.assert_type(domain, int, custom_message=f"{fn}: {name} must be integer")


def _token_weights(n: int, token_mask_N: jax.Array | None) -> jax.Array:
    return jnp.ones((n,), jnp.float32) if token_mask_N is None else token_mask_N.astype(jnp.float32)


def gate_hits(pre_NxE: jax.Array, surprise_NxE: jax.Array, token_mask_N: jax.Array | None = None):
    """(hits, count): tokens with argmax pre == argmin S, and tokens counted (mask > 0)."""
    _check_pre_and_surprise("gate_hits", pre_NxE, surprise_NxE)
    check_per_token("gate_hits", "token_mask_N", token_mask_N, pre_NxE.shape[0])
    m = _token_weights(pre_NxE.shape[0], token_mask_N) > 0
    hit = jnp.argmax(pre_NxE, axis=-1) == jnp.argmin(surprise_NxE, axis=-1)
    return jnp.sum(hit & m).astype(jnp.float32), jnp.sum(m).astype(jnp.float32)


def gate_accuracy(pre_NxE: jax.Array, surprise_NxE: jax.Array,
                  token_mask_N: jax.Array | None = None) -> jax.Array:
    """Share of counted tokens whose gate's top expert is the Surprise target (0 if none).

    Pass the loss mask as `token_mask_N` for the accuracy on unmasked tokens: in the top
    layer a masked token has g = 0, hence S[t, :] constant and an arbitrary argmin.
    """
    hits, count = gate_hits(pre_NxE, surprise_NxE, token_mask_N)
    return hits / jnp.maximum(count, 1.0)


def surprise_target_counts(surprise_NxE: jax.Array, mask_NxE: jax.Array,
                           token_mask_N: jax.Array | None = None):
    """(inactive [], per-expert [E]): how often the hard gate target argmin S is an inactive
    expert, and how often each expert is the target, over counted tokens.

    With the faithful S = w |g| every token that has an inactive expert gets the first
    inactive expert as its target, and a token with g = 0 gets expert 0.
    """
    check_scores("surprise_target_counts", "surprise_NxE", surprise_NxE)
    chex.assert_equal_shape([surprise_NxE, mask_NxE],
                            custom_message="surprise_target_counts: mask_NxE must be [N, E] like surprise_NxE")
    check_per_token("surprise_target_counts", "token_mask_N", token_mask_N, surprise_NxE.shape[0])
    w = _token_weights(surprise_NxE.shape[0], token_mask_N)
    target_N = jnp.argmin(surprise_NxE, axis=-1)
    active_N = jnp.take_along_axis(mask_NxE, target_N[:, None], axis=-1)[:, 0]
    hist_E = jnp.einsum("ne,n->e", jax.nn.one_hot(target_N, surprise_NxE.shape[-1], dtype=jnp.float32), w,
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(w * (~active_N).astype(jnp.float32)), hist_E


def fallback_count(pre_NxE: jax.Array, token_mask_N: jax.Array | None = None) -> jax.Array:
    """Counted tokens of the top-any gate with no expert above its threshold (pre <= 0
    everywhere), i.e. routed by the top-`fallback_k` fallback."""
    check_scores("fallback_count", "pre_NxE", pre_NxE)
    check_per_token("fallback_count", "token_mask_N", token_mask_N, pre_NxE.shape[0])
    w = _token_weights(pre_NxE.shape[0], token_mask_N)
    return jnp.sum(w * (~jnp.any(pre_NxE > 0, axis=-1)).astype(jnp.float32))


def domain_expert_counts(mask_NxE: jax.Array, domain_N: jax.Array, num_domains: int,
                         token_mask_N: jax.Array | None = None) -> jax.Array:
    """[D, E] number of (token, active expert) pairs per token domain and expert.

    Tokens with a domain outside [0, num_domains) (e.g. -1 padding rows) are not counted.
    mask_NxE [N, E] (bool or 0/1), domain_N integer [N], token_mask_N [N].
    """
    chex.assert_rank(mask_NxE, 2, custom_message="domain_expert_counts: mask_NxE must be [N, E]")
    _check_domains("domain_expert_counts", "domain_N", domain_N, mask_NxE.shape[0])
    check_per_token("domain_expert_counts", "token_mask_N", token_mask_N, mask_NxE.shape[0])
    onehot_NxD = jax.nn.one_hot(domain_N, num_domains, dtype=jnp.float32)  # -1 -> zeros
    onehot_NxD = onehot_NxD * _token_weights(mask_NxE.shape[0], token_mask_N)[:, None]
    return jnp.einsum("nd,ne->de", onehot_NxD, mask_NxE.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def domain_token_counts(domain_N: jax.Array, num_domains: int,
                        token_mask_N: jax.Array | None = None) -> jax.Array:
    """[D] tokens per domain (counted tokens only); domain_N integer [N], token_mask_N [N]."""
    _check_domains("domain_token_counts", "domain_N", domain_N, None)
    check_per_token("domain_token_counts", "token_mask_N", token_mask_N, domain_N.shape[0])
    w = _token_weights(domain_N.shape[0], token_mask_N)
    return jnp.einsum("nd,n->d", jax.nn.one_hot(domain_N, num_domains, dtype=jnp.float32), w,
                      precision=jax.lax.Precision.HIGHEST)


def _entropy(p: jax.Array, axis: int) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def nmi_from_counts(counts_DxE: jax.Array) -> jax.Array:
    """Normalised mutual information I(E;D)/sqrt(H(E)H(D)) of a [..., D, E] count table
    (leading axes, e.g. layers, are kept). 0 where an entropy or the total is 0."""
    chex.assert_shape(counts_DxE, (..., None, None), custom_message="nmi_from_counts: counts_DxE must be [..., D, E]")
    n = counts_DxE.astype(jnp.float32)
    p = n / jnp.maximum(jnp.sum(n, axis=(-2, -1), keepdims=True), 1e-30)
    p_d = jnp.sum(p, axis=-1, keepdims=True)
    p_e = jnp.sum(p, axis=-2, keepdims=True)
    ratio = jnp.where(p > 0, p / jnp.maximum(p_d * p_e, 1e-30), 1.0)
    mi = jnp.sum(jnp.where(p > 0, p * jnp.log(ratio), 0.0), axis=(-2, -1))
    h_d, h_e = _entropy(p_d[..., 0], -1), _entropy(p_e[..., 0, :], -1)
    den = jnp.sqrt(h_d * h_e)
    return jnp.where(den > 0, mi / jnp.where(den > 0, den, 1.0), 0.0)


def avg_k_from_counts(counts_DxE: jax.Array, tokens_D: jax.Array) -> jax.Array:
    """[..., D] mean active experts per token of each domain (NaN for a domain with no token).
    counts_DxE [..., D, E], tokens_D [D]."""
    chex.assert_rank(tokens_D, 1, custom_message="avg_k_from_counts: tokens_D must be [D]")
    chex.assert_shape(counts_DxE, (..., tokens_D.shape[0], None),
                      custom_message="avg_k_from_counts: counts_DxE must be [..., D, E], D of tokens_D")
    pairs = jnp.sum(counts_DxE.astype(jnp.float32), axis=-1)
    return jnp.where(tokens_D > 0, pairs / jnp.maximum(tokens_D, 1e-30), jnp.nan)


def domain_loss_sums(ce_BxT: jax.Array, loss_mask_BxT: jax.Array, domain_B: jax.Array,
                     num_domains: int):
    """(loss sum [D], counted tokens [D]) of the per-position loss, rows grouped by domain.
    ce_BxT and loss_mask_BxT [B, T], domain_B integer [B]."""
    chex.assert_rank(ce_BxT, 2, custom_message="domain_loss_sums: ce_BxT must be [B, T]")
    chex.assert_equal_shape([ce_BxT, loss_mask_BxT],
                            custom_message="domain_loss_sums: loss_mask_BxT must be [B, T] like ce_BxT")
    _check_domains("domain_loss_sums", "domain_B", domain_B, ce_BxT.shape[0], "B")
    onehot_BxD = jax.nn.one_hot(domain_B, num_domains, dtype=jnp.float32)
    m = loss_mask_BxT.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    return (jnp.einsum("bd,b->d", onehot_BxD, jnp.sum(ce_BxT.astype(jnp.float32) * m, -1), precision=hp),
            jnp.einsum("bd,b->d", onehot_BxD, jnp.sum(m, -1), precision=hp))


def domain_means(sums_D: jax.Array, counts_D: jax.Array) -> jax.Array:
    """Per-domain means, NaN where a domain has nothing counted (sums_D, counts_D of one shape)."""
    chex.assert_equal_shape([sums_D, counts_D], custom_message="domain_means: counts_D must be shaped like sums_D")
    return jnp.where(counts_D > 0, sums_D / jnp.maximum(counts_D, 1e-30), jnp.nan)
