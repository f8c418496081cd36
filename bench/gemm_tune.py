"""Grouped-GEMM backends and Mosaic GPU block sizes, one JSON line per (shape, backend, blocks).

    python -m bench.gemm_tune --shapes 131072x512x256,131072x256x512 --groups 64

Times y = x @ w[g(row)] forward and forward + backward (dx, dw) through
onn_jax.dispatch.grouped_gemm.grouped_matmul on uneven groups (bf16), for the XLA `ragged_dot`, an
equal-group einsum (the upper bound: same FLOPs, no raggedness) and every Mosaic GPU block
configuration in the grid (Hopper only). TF/s count 2*R*K*N per matmul (x3 with backward).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import time_fn
from onn_jax.dispatch import grouped_gemm as gg

FWD_GRID = dict(block_m=(64, 128), block_n=(128, 256), block_k=(64,), max_concurrent_steps=(2, 4),
                grid_block_n=(1,))
DW_GRID = dict(block_m=(64, 128), block_n=(64, 128), block_k=(64,), max_concurrent_steps=(2, 4),
               grid_block_n=(1,))


def uneven_sizes(rows: int, groups: int, seed: int = 0) -> np.ndarray:
    """Group sizes summing to rows, spread like a skewed router (some groups 3x the mean)."""
    w = np.random.default_rng(seed).gamma(1.0, 1.0, groups)
    sizes = np.floor(w / w.sum() * rows).astype(np.int32)
    sizes[-1] += rows - sizes.sum()
    return sizes


def timings(fn, x, w, sizes):
    loss = lambda x, w: jnp.sum(fn(x, w, sizes).astype(jnp.float32))
    return time_fn(jax.jit(fn), x, w, sizes), time_fn(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w)


def grid(spec):
    keys = list(spec)
    return [dict(zip(keys, vals)) for vals in itertools.product(*spec.values())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gemm_tune", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="131072x512x256,131072x256x512", help="RxKxN,...")
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--no-grid", action="store_true", help="only the shipped Mosaic blocks")
    ap.add_argument("--fwd-grid", type=json.loads, default=None,
                    help='JSON {"block_m": [...], ...} replacing FWD_GRID (forward and dx blocks)')
    ap.add_argument("--dw-grid", type=json.loads, default=None, help="JSON replacing DW_GRID (dw blocks)")
    args = ap.parse_args(argv)
    hopper = gg.is_hopper()
    for shape in args.shapes.split(","):
        r, k, n = (int(v) for v in shape.split("x"))
        key = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(key[0], (r, k), jnp.bfloat16)
        w = (jax.random.normal(key[1], (args.groups, k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
        sizes = jnp.asarray(uneven_sizes(r, args.groups))
        flops = 2.0 * r * k * n
        base = {"shape": shape, "groups": args.groups, "max_group": int(sizes.max()),
                "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
        ref = gg.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), sizes, "ragged_dot")

        def emit(name, fn, **extra):
            try:
                err = None if name == "equal_einsum" else float(
                    jnp.max(jnp.abs(fn(x, w, sizes).astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                f_ms, fb_ms = timings(fn, x, w, sizes)
                rec = {**base, "backend": name, **extra, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                       "fwd_tflops": round(flops / f_ms / 1e9, 1),
                       "fwd_bwd_tflops": round(3 * flops / fb_ms / 1e9, 1), "max_rel_err": err}
            except Exception as e:  # e.g. a block config that exceeds shared memory
                rec = {**base, "backend": name, **extra, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(rec), flush=True)
            return rec

        emit("ragged_dot", lambda x, w, s: gg.grouped_matmul(x, w, s, "ragged_dot"))
        eq = r // args.groups
        emit("equal_einsum", lambda x, w, s: jnp.einsum(
            "gmk,gkn->gmn", x[: eq * args.groups].reshape(args.groups, eq, k), w).reshape(-1, n))
        if not hopper:
            continue
        shipped_fwd, shipped_dw = dict(gg.MGPU_FWD), dict(gg.MGPU_DW)
        mg = lambda x, w, s: gg.grouped_matmul(x, w, s, "mosaic_gpu")
        emit("mosaic_gpu", mg, fwd_blocks=shipped_fwd, dw_blocks=shipped_dw)
        if args.no_grid:
            continue
        for fwd in grid(args.fwd_grid or FWD_GRID):  # forward (and dx) blocks, dw blocks as shipped
            if n % (fwd["block_n"] * fwd["grid_block_n"]) or k % fwd["block_n"]:
                continue
            gg.MGPU_FWD.clear(), gg.MGPU_FWD.update(fwd)
            emit("mosaic_gpu", mg, fwd_blocks=fwd, dw_blocks=shipped_dw)
        gg.MGPU_FWD.clear(), gg.MGPU_FWD.update(shipped_fwd)
        for dw in grid(args.dw_grid or DW_GRID):
            if k % dw["block_m"] or n % dw["block_n"]:
                continue
            gg.MGPU_DW.clear(), gg.MGPU_DW.update(dw)
            emit("mosaic_gpu", mg, fwd_blocks=shipped_fwd, dw_blocks=dw)
        gg.MGPU_DW.clear(), gg.MGPU_DW.update(shipped_dw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
