"""Per-token sums of expert-sorted rows, deterministic: out[t] = sum_j w[r_tj] * a[r_tj].

r_tj is token t's j-th kept row in token-major (expert) order, j < count_N[t]; the rows come
from the dropless layout (onn_jax.dispatch.dropless: order_R, start_N, count_N). Every token's terms
are added one after another in that fixed order, in float32, with no atomics, so a GPU gives
the same bits run to run. Two implementations of the same sum (`model.moe.token_sum`):

  loop    a fori_loop over j < max_t count_t; step j gathers every token's j-th row and adds it
          into an [N, C] float32 accumulator (portable: CPU, TPU, GPU). It reads and writes the
          whole accumulator once per j, so its cost grows with the largest k in the batch.
  pallas  one Pallas (Triton) kernel: a program per (token, block of C) loops over that token's
          own rows only, reading each row once. Compiled on NVIDIA GPUs; elsewhere it runs in
          Pallas's interpret mode (slow: a correctness check, which the CPU tests use).
  auto    pallas on an NVIDIA GPU when C has a power-of-2 block of at least 32 columns, else loop.

The backward of both is the same two gathers: da[r] = w[r] * g[token_R[r]] and
dw[r] = <g[token_R[r]], a[r]> (zero for rows that hold no kept pair).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from onn_jax.config import TOKEN_SUMS

MIN_BLOCK_C = 32   # auto's smallest column block for the kernel
MAX_BLOCK_C = 1024


def resolve_token_sum(name: str, hidden: int) -> str:
    """The implementation `name` stands for here: auto -> pallas on an NVIDIA GPU, else loop."""
    if name != "auto":
        return name
    dev = jax.devices()[0]
    on_nvidia = dev.platform == "gpu" and "nvidia" in str(getattr(dev, "device_kind", "")).lower()
    return "pallas" if on_nvidia and column_block(hidden) >= MIN_BLOCK_C else "loop"


def column_block(hidden: int) -> int:
    """The largest power of 2 <= MAX_BLOCK_C dividing `hidden` (the kernel's block of C)."""
    block = 1
    while hidden % (2 * block) == 0 and 2 * block <= MAX_BLOCK_C:
        block *= 2
    return block


def token_sums(a_RxC: jax.Array, w_R: jax.Array | None, order_R: jax.Array, start_N: jax.Array,
               count_N: jax.Array, token_R: jax.Array, impl: str = "loop",
               interpret: bool | None = None) -> jax.Array:
    """out[t] = sum_{j < count_N[t]} w[r] * a[r], r = order_R[start_N[t] + j], float32 [N, C].

    w_R None means all ones. token_R[r] is the token of row r (N for rows of no kept pair).
    interpret (pallas only): None = interpret mode unless the default device is a GPU."""
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    w = jnp.ones(a_RxC.shape[:1], jnp.float32) if w_R is None else w_R.astype(jnp.float32)
    index = (order_R.astype(jnp.int32), start_N.astype(jnp.int32), count_N.astype(jnp.int32),
             token_R.astype(jnp.int32))
    return _token_sums(a_RxC, w, index, impl, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_sums(a_RxC, w_R, index, impl, interpret):
    order_R, start_N, count_N, _ = index
    if impl == "loop":
        return _loop_sums(a_RxC, w_R, order_R, start_N, count_N)
    if impl == "pallas":
        return _pallas_sums(a_RxC, w_R, order_R, start_N, count_N, interpret)
    raise ValueError(f"unknown token-sum implementation {impl!r}; known: {TOKEN_SUMS[1:]}")


def _token_sums_fwd(a_RxC, w_R, index, impl, interpret):
    return _token_sums(a_RxC, w_R, index, impl, interpret), (a_RxC, w_R, index)


def _token_sums_bwd(impl, interpret, res, g_NxC):
    a_RxC, w_R, index = res
    g_RxC = g_NxC.at[index[3]].get(mode="fill", fill_value=0)      # the row's token's cotangent
    da_RxC = (w_R[:, None] * g_RxC).astype(a_RxC.dtype)
    dw_R = jnp.sum(g_RxC * a_RxC.astype(jnp.float32), axis=-1)
    zeros = jax.tree.map(lambda i: jnp.zeros(i.shape, jax.dtypes.float0), index)
    return da_RxC, dw_R, zeros


_token_sums.defvjp(_token_sums_fwd, _token_sums_bwd)


def _loop_sums(a_RxC, w_R, order_R, start_N, count_N):
    rows, n, c = a_RxC.shape[0], start_N.shape[0], a_RxC.shape[-1]

    def add_jth(j, out_NxC):
        pos_N = jnp.where(j < count_N, start_N + j, rows)
        row_N = order_R.at[pos_N].get(mode="fill", fill_value=rows)
        w_N = w_R.at[row_N].get(mode="fill", fill_value=0)
        return out_NxC + w_N[:, None] * a_RxC.at[row_N].get(mode="fill", fill_value=0).astype(jnp.float32)

    return jax.lax.fori_loop(0, jnp.max(count_N, initial=0), add_jth, jnp.zeros((n, c), jnp.float32))


def _sum_kernel(start_ref, count_ref, order_ref, w_ref, a_ref, out_ref, *, block_c):
    """One token, one block of columns: acc += w[r] * a[r, cols] over the token's rows in order."""
    t = pl.program_id(0)
    cols = pl.ds(pl.program_id(1) * block_c, block_c)
    start = start_ref[t]

    def add(j, acc):
        r = order_ref[start + j]
        return acc + w_ref[r] * a_ref[r, cols].astype(jnp.float32)

    out_ref[...] = jax.lax.fori_loop(0, count_ref[t], add, jnp.zeros((block_c,), jnp.float32))


def _pallas_sums(a_RxC, w_R, order_R, start_N, count_N, interpret):
    n, c = start_N.shape[0], a_RxC.shape[-1]
    block_c = column_block(c)
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, j: (0,) * x.ndim)
    operands = (start_N, count_N, order_R, w_R, a_RxC)
    return pl.pallas_call(
        functools.partial(_sum_kernel, block_c=block_c),
        grid=(n, c // block_c),
        in_specs=[whole(x) for x in operands],
        out_specs=pl.BlockSpec((None, block_c), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((n, c), jnp.float32),
        compiler_params=_triton_params(block_c),
        interpret=interpret,
        name="onn_token_sums",
    )(*operands)


def _triton_params(block_c: int):
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=max(1, min(4, block_c // 128)), num_stages=1)

