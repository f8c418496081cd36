"""Grouped GEMM for the dropless dispatch: y[r] = x[r] @ w[g(r)] over expert-sorted rows.

Rows x_RxK are sorted by group (expert); group g owns rows [start_g, start_g + sizes_g), and
the sizes sum to R (the caller gives padding rows to the last group). Backends
(`model.moe.gemm`):

  ragged_dot  jax.lax.ragged_dot: portable (CPU, TPU), its gradients by JAX's own rules.
  mosaic_gpu  the Pallas Mosaic GPU kernels that ship inside jax (Hopper, bf16/f16):
              y = ragged_dot(x, w), dx = ragged_dot(dy, w, transpose_rhs),
              dw = transposed_ragged_dot(x, dy). No new compiled dependency.
  padded      every group's matmul on every row, then each row keeps its own group's result:
              exact and simple, G times the FLOPs (a reference, not a fast path).
  auto        mosaic_gpu on a Hopper GPU with a 16-bit dtype, else ragged_dot.

Every backend runs inside one jax.custom_vjp that takes the weights in their stored dtype and
rounds them in the forward and again in the backward (`grouped_matmul`).
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

# Mosaic GPU block sizes (kernel keyword arguments). `block_k` must divide the contraction
# size; the forward's block_n, dw's block_m/block_n must divide the output sizes.
MGPU_FWD = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
MGPU_DW = dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=4, grid_block_n=1)


class GemmUnavailable(RuntimeError):
    """The requested grouped-GEMM backend cannot run here (names the field and the reason)."""


def is_hopper(device=None) -> bool:
    """True on an NVIDIA GPU of compute capability 9.x (H100, H200, H800, H20)."""
    device = device or jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def mgpu_kernels():
    """(ragged_dot, transposed_ragged_dot) from jax.experimental.pallas.ops.gpu, checked.

    Both modules exist with these signatures in jax 0.10.2 and 0.11.2; the forward must accept
    `transpose_rhs` (older jax lacks it), else GemmUnavailable."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    except ImportError as e:  # pragma: no cover - depends on the jax build
        raise GemmUnavailable(f"model.moe.gemm: mosaic_gpu kernels not importable in jax "
                              f"{jax.__version__}: {e}") from e
    fwd, dw = ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot
    if "transpose_rhs" not in inspect.signature(fwd).parameters:
        raise GemmUnavailable(f"model.moe.gemm: jax {jax.__version__}'s ragged_dot_mgpu has no "
                              "transpose_rhs (needed for dx); use gemm='ragged_dot'")
    return fwd, dw


def resolve_gemm(name: str, dtype) -> str:
    """The backend `name` stands for here; refuses mosaic_gpu off a Hopper GPU."""
    sixteen = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        return "mosaic_gpu" if is_hopper() and sixteen else "ragged_dot"
    if name == "mosaic_gpu":
        dev = jax.devices()[0]
        if not is_hopper(dev):
            raise GemmUnavailable("model.moe.gemm: 'mosaic_gpu' needs a Hopper GPU (compute "
                                  f"capability 9.x); this device is {dev.device_kind!r} "
                                  f"({dev.platform}). Use gemm='ragged_dot' or 'auto'.")
        if not sixteen:
            raise GemmUnavailable("model.moe.gemm: 'mosaic_gpu' needs bfloat16 or float16 "
                                  f"compute, got {jnp.dtype(dtype).name} (set model.dtype)")
        mgpu_kernels()
    return name


def grouped_matmul(x_RxK: jax.Array, w_GxKxN: jax.Array, sizes_G: jax.Array,
                   backend: str = "ragged_dot") -> jax.Array:
    """y[r] = x[r] @ w[g(r)], [R, N] in x's dtype; `backend` as resolved by resolve_gemm.

    w is taken in its stored dtype (float32 parameters) and rounded to x's dtype inside a
    custom VJP, in the forward and again in the backward: what the backward keeps is w itself
    (a parameter: no copy), not a rounded [G, K, N] copy per layer (2 GiB over gpu_olmoe's 4
    layers). Same values and gradients as rounding first (dw is rounded back to w's dtype)."""
    if backend not in ("ragged_dot", "mosaic_gpu", "padded"):
        raise ValueError(f"unknown grouped-GEMM backend {backend!r}")
    return _grouped(x_RxK, w_GxKxN, sizes_G.astype(jnp.int32), backend)


def _matmul(backend: str, x_RxK, w_GxKxN, sizes_G):
    """The backend's product, w already in x's dtype."""
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x_RxK, w_GxKxN, sizes_G)
    if backend == "mosaic_gpu":
        fwd, _ = mgpu_kernels()
        return fwd(x_RxK, w_GxKxN, group_sizes=sizes_G, **MGPU_FWD)
    return _padded_matmul(x_RxK, w_GxKxN, sizes_G)


def rounded_matmul(backend: str, x_RxK, w_GxKxN, sizes_G):
    """The product with w rounded to x's dtype first (no VJP of its own: for custom VJPs that
    hold their own residuals, as `grouped_matmul` and onn_jax.dispatch.dropless do)."""
    return _matmul(backend, x_RxK, w_GxKxN.astype(x_RxK.dtype), sizes_G)


def rounded_matmul_vjp(backend: str, x_RxK, w_GxKxN, sizes_G, dy_RxN):
    """(dx, dw) of `rounded_matmul` for the cotangent dy: dx = dy @ w[g]^T and dw[g] = x[g]^T @
    dy[g], dw in w's dtype. Mosaic: dx by the forward kernel with transpose_rhs, dw by the
    transposed ragged kernel; other backends: JAX's own rules."""
    w_lo = w_GxKxN.astype(x_RxK.dtype)
    dy_RxN = dy_RxN.astype(x_RxK.dtype)
    if backend == "mosaic_gpu":
        fwd, dw = mgpu_kernels()
        dx_RxK = fwd(dy_RxN, w_lo, group_sizes=sizes_G, transpose_rhs=True, **MGPU_FWD)
        dw_GxKxN = dw(x_RxK, dy_RxN, group_sizes=sizes_G, **MGPU_DW)
    else:
        _, pullback = jax.vjp(lambda x, w: _matmul(backend, x, w, sizes_G), x_RxK, w_lo)
        dx_RxK, dw_GxKxN = pullback(dy_RxN)
    return dx_RxK, dw_GxKxN.astype(w_GxKxN.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x_RxK, w_GxKxN, sizes_G, backend):
    return rounded_matmul(backend, x_RxK, w_GxKxN, sizes_G)


def _grouped_fwd(x_RxK, w_GxKxN, sizes_G, backend):
    return _grouped(x_RxK, w_GxKxN, sizes_G, backend), (x_RxK, w_GxKxN, sizes_G)


def _grouped_bwd(backend, res, dy_RxN):
    x_RxK, w_GxKxN, sizes_G = res
    return (*rounded_matmul_vjp(backend, x_RxK, w_GxKxN, sizes_G, dy_RxN), None)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def group_of_rows(sizes_G: jax.Array, num_rows: int) -> jax.Array:
    """g(r) for r in [0, R): the group whose row range holds r, int32 [R]."""
    ends_G = jnp.cumsum(sizes_G)
    return jnp.searchsorted(ends_G, jnp.arange(num_rows, dtype=ends_G.dtype), side="right").astype(jnp.int32)


def _padded_matmul(x_RxK, w_GxKxN, sizes_G):
    y_RxGxN = jnp.einsum("rk,gkn->rgn", x_RxK, w_GxKxN)
    g_R = jnp.minimum(group_of_rows(sizes_G, x_RxK.shape[0]), w_GxKxN.shape[0] - 1)
    return jnp.take_along_axis(y_RxGxN, g_R[:, None, None], axis=1)[:, 0]
