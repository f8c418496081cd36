"""The LM head and its cross entropy fused, over chunks of positions (model.output.loss_chunk).

The reference path assembles logits [B, T, V] (bfloat16 from the head, then a float32 copy),
and the backward holds them and d loss / d logits [B, T, V] as well: at V = 50304 and 16k
tokens that is ~3 GiB per float32 copy, alive at the step's memory peak. Here the head runs
over chunks of `chunk` positions of every sequence (B * chunk tokens at a time) inside a
`lax.scan`, and the loss's gradient with respect to the hidden states and the kernel is formed
in the same pass (a `jax.custom_vjp`; the loss is the end of the graph, so d loss / d logits
= (softmax - onehot) * mask / count is known in the forward). What stays for the backward is
dh [B, T, C] and dW [C, V] float32; the pullback scales them by the loss's cotangent, so the
two pullbacks of the Surprise step cost nothing here.

Same math as the reference (`head_logits` then onn_jax.core.losses.next_token_loss): logits in
the head's dtype (bfloat16 in a bfloat16 model, rounded as the Dense head rounds them), then
float32 for the softmax; d logits rounded to the head's dtype before the two backward GEMMs.
dW is accumulated over chunks in float32 (the reference rounds the one GEMM's result to the
head's dtype once): equal in a float32 model up to summation order, within bfloat16 rounding
otherwise. Chunking over positions keeps the batch axis whole in every chunk, so a batch
sharded over devices stays sharded. A sequence length that `chunk` does not divide is padded
with positions of weight 0.

The per-position CE and the predictions come out as constants (no gradient flows through
them: they are metrics); only the mean loss is differentiable.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp


def head_logits(h_BxTxC: jax.Array, kernel_CxV: jax.Array, dtype) -> jax.Array:
    """Logits [B, T, V] float32 as the Dense head makes them: both operands in `dtype`, the
    product rounded to `dtype`, then float32."""
    return jnp.einsum("btc,cv->btv", h_BxTxC.astype(dtype), kernel_CxV.astype(dtype)).astype(jnp.float32)


def _in_chunks(x, chunk: int, pad: int):
    """[B, T, ...] -> [T' / chunk, B, chunk, ...], T padded with zeros to T' = T + pad."""
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _from_chunks(x, t: int):
    """[T' / chunk, B, chunk, ...] -> [B, t, ...] (the padding cut off)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _fused(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT, chunk: int, dtype, groups: int):
    """(loss, ce_BxT, pred_BxT) and the loss's gradients (dh, dW), in one scan over chunks.

    dW is carried as `groups` partial sums [G, C, V], each over B / G sequences: with the batch
    sharded G ways, each device adds to its own slice and the one reduction over devices comes
    after the scan (a single [C, V] sum over chunks would reduce across devices every chunk)."""
    b, t = h_BxTxC.shape[:2]
    pad = -t % chunk
    w_lo = kernel_CxV.astype(dtype)
    c, v = kernel_CxV.shape

    def one_chunk(dw_GxCxV, xs):
        h_c, y_c, wt_c = xs
        h_lo = h_c.astype(dtype)
        z = jnp.einsum("bsc,cv->bsv", h_lo, w_lo).astype(jnp.float32)
        lse = jax.nn.logsumexp(z, axis=-1)
        ce = lse - jnp.take_along_axis(z, y_c[..., None], axis=-1)[..., 0]
        pred = jnp.argmax(z, axis=-1).astype(targets_BxT.dtype)
        dz = (jnp.exp(z - lse[..., None]) - jax.nn.one_hot(y_c, v, dtype=jnp.float32)) * wt_c[..., None]
        dz_lo = dz.astype(dtype)
        dh = jnp.einsum("bsv,cv->bsc", dz_lo, w_lo).astype(h_BxTxC.dtype)
        per_group = lambda x: x.reshape(groups, b // groups, *x.shape[1:])
        dw_GxCxV = dw_GxCxV + jnp.einsum("gbsc,gbsv->gcv", per_group(h_lo), per_group(dz_lo),
                                         preferred_element_type=jnp.float32)
        return dw_GxCxV, (ce, pred, dh)

    xs = tuple(_in_chunks(x, chunk, pad) for x in (h_BxTxC, targets_BxT, weights_BxT))
    dw, (ce, pred, dh) = jax.lax.scan(one_chunk, jnp.zeros((groups, c, v), jnp.float32), xs)
    dw = jnp.sum(dw, axis=0)
    ce_BxT, pred_BxT, dh_BxTxC = (_from_chunks(x, t) for x in (ce, pred, dh))
    loss = jnp.sum(ce_BxT * weights_BxT)
    return (loss, ce_BxT, pred_BxT), (dh_BxTxC, dw.astype(kernel_CxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_loss(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT, chunk, dtype, groups):
    return _fused(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT, chunk, dtype, groups)[0]


def _fused_loss_fwd(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT, chunk, dtype, groups):
    return _fused(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT, chunk, dtype, groups)


def _fused_loss_bwd(chunk, dtype, groups, grads, cotangents):
    """Only the loss's cotangent flows (ce and pred leave through stop_gradient)."""
    dh, dw = grads
    g = cotangents[0]
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def chunked_head_loss(h_BxTxC: jax.Array, kernel_CxV: jax.Array, targets_BxT: jax.Array,
                      mask_BxT: jax.Array, chunk: int, dtype=jnp.float32, batch_shards: int = 1):
    """The dense head's next-token loss without [B, T, V] in memory: (mean CE over unmasked
    labels, accuracy, counted labels, per-position CE [B, T]), as next_token_loss of
    head_logits(h, kernel, dtype). Differentiable in h and kernel through the mean CE only.

    h_BxTxC floating [B, T, C]; kernel_CxV floating [C, V]; targets_BxT integer and mask_BxT
    (0/1, any dtype) [B, T]; chunk: positions of each sequence per step of the scan (>= 1);
    batch_shards: how many ways the batch axis is sharded (the kernel's gradient is summed per
    shard inside the scan and across shards once after it; B must be a multiple).
    """
    chex.assert_rank(h_BxTxC, 3, custom_message="chunked_head_loss: h_BxTxC must be [B, T, C]")
    chex.assert_rank(kernel_CxV, 2, custom_message="chunked_head_loss: kernel_CxV must be [C, V]")
    chex.assert_equal(h_BxTxC.shape[2], kernel_CxV.shape[0],
                      custom_message="chunked_head_loss: kernel_CxV must be [C, V] for h_BxTxC [B, T, C]")
    chex.assert_type(targets_BxT, int, custom_message="chunked_head_loss: targets_BxT must be integer")
    chex.assert_shape([targets_BxT, mask_BxT], h_BxTxC.shape[:2],
                      custom_message="chunked_head_loss: targets_BxT and mask_BxT must be [B, T] of h_BxTxC")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunked_head_loss: chunk must be an integer >= 1, got {chunk!r}")
    if not (isinstance(batch_shards, int) and batch_shards >= 1 and h_BxTxC.shape[0] % batch_shards == 0):
        raise ValueError(f"chunked_head_loss: batch_shards must be an integer >= 1 dividing B = "
                         f"{h_BxTxC.shape[0]}, got {batch_shards!r}")
    mask = mask_BxT.astype(jnp.float32)
    count = jnp.sum(mask)
    weights_BxT = jax.lax.stop_gradient(mask / jnp.maximum(count, 1.0))
    loss, ce_BxT, pred_BxT = _fused_loss(h_BxTxC, kernel_CxV, targets_BxT, weights_BxT,
                                         min(chunk, h_BxTxC.shape[1]), jnp.dtype(dtype), batch_shards)
    acc = jnp.sum((pred_BxT == targets_BxT).astype(jnp.float32) * mask) / jnp.maximum(count, 1.0)
    return loss, acc, count, jax.lax.stop_gradient(ce_BxT)
