"""Micro-benchmarks of the step's hot spots, one JSON line per (case, variant).

    python -m bench.kernels [--cases combine,attention,head] [--size gpu_large]

Each variant is timed (median of --reps waited-for calls after one) forward alone and
forward + VJP, and checked against the case's reference variant (relative L2 error of
the output and of every cotangent). The step's own choices in onn_jax were picked from
these figures (docs/BENCHMARKS.md); this program keeps the alternatives measurable.

Cases:
  combine    token-major reduction out[t] = sum_e w[t, e] y[e, slot(t, e)] of the sparse
             dispatch (also its dispatch backward, with w = 1)
  attention  causal softmax attention [B, T, H, D]
  head       LM head + masked next-token cross entropy on [N, C] hidden states
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import time_fn

SIZES = {  # (N tokens, E experts, C hidden, k active per token, B, T, H, V vocab)
    "tiny": dict(n=512, e=8, c=32, k=2, b=8, t=64, h=4, v=262),
    "gpu_large": dict(n=16384, e=64, c=512, k=8, b=32, t=512, h=8, v=32000),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a.astype(jnp.float32), np.float64), np.asarray(b.astype(jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_case(case: str, variants: dict[str, Callable], args: tuple, reps: int, extra: dict) -> None:
    """Times every variant's forward and forward+VJP; errors against the first variant."""
    ref_out, ref_vjp = None, None
    for name, f in variants.items():
        rec = {"case": case, "variant": name, **extra}
        try:
            fwd = jax.jit(f)
            out = fwd(*args)
            ct = jax.tree.map(lambda o: jnp.asarray(
                np.random.default_rng(1).standard_normal(o.shape), o.dtype), out)

            def fwd_bwd(*a, f=f):
                o, pull = jax.vjp(f, *a)
                return o, pull(ct)

            both = jax.jit(fwd_bwd)
            _, grads = both(*args)
            rec["fwd_ms"] = time_fn(fwd, *args, reps=reps)
            rec["fwd_bwd_ms"] = time_fn(both, *args, reps=reps)
            if ref_out is None:
                ref_out, ref_vjp = out, grads
            else:
                rec["out_err"] = rel_err(out, ref_out)
                rec["grad_err"] = max((rel_err(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_vjp))
                                       if jnp.issubdtype(r.dtype, jnp.floating)), default=0.0)
        except Exception as e:  # a variant the backend does not support: report it, go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(rec), flush=True)


# --- combine ---------------------------------------------------------------------------

def combine_inputs(s: dict, seed: int = 0):
    """A top-any-like mask (about k of E per token, the empty tokens falling back to E/2),
    its capacity dispatch at 1.25 * N * k / E slots, float32 slot outputs and weights."""
    from onn_jax.dispatch.capacity import make_dispatch
    n, e, c, k = s["n"], s["e"], s["c"], s["k"]
    rng = np.random.default_rng(seed)
    mask = rng.random((n, e)) < k / e
    empty = ~mask.any(1)
    mask[empty, : e // 2] = True
    cap = int(np.ceil(1.25 * n * k / e))
    d = make_dispatch(jnp.asarray(mask), cap)
    w = jnp.asarray(rng.random((n, e)) * mask, jnp.float32)
    y = jnp.asarray(rng.standard_normal((e, cap, c)), jnp.float32)
    return d, w, y, int(mask.sum(1).max())


def combine_variants(d, max_k: int) -> dict[str, Callable]:
    from onn_jax.dispatch.capacity import combine_slots, to_pairs
    n, e = d.slot_NxE.shape
    cap = d.token_ExK.shape[1]
    token_flat = d.token_ExK.reshape(-1)
    flat_slot_NxE = jnp.where(d.kept_NxE, jnp.arange(e)[None, :] * cap + d.slot_NxE, e * cap)
    order = jnp.argsort(token_flat, stable=True)
    # rank table: the r-th kept pair of token t, [R, N] flat slot indices (pad e*cap)
    rank_NxE = jnp.cumsum(d.kept_NxE.astype(jnp.int32), axis=1) - 1
    table_RxN = jnp.full((max_k, n), e * cap, jnp.int32).at[
        jnp.where(d.kept_NxE, rank_NxE, max_k), jnp.arange(n)[:, None]].set(flat_slot_NxE, mode="drop")

    def w_slots(w):  # w[token(e, k), e] in slot space, 0 for empty slots
        w_pad = jnp.concatenate([w, jnp.zeros((1, e), w.dtype)], 0)
        return w_pad[d.token_ExK, jnp.arange(e)[:, None]]

    def pair_gather(w, y):  # gather every token's E pair entries, reduce over E (autodiff)
        return jnp.sum(w[..., None] * to_pairs(y, d), axis=1)

    def shipped(w, y):  # onn_jax.dispatch.capacity.combine_slots: token order from the mask, segment sum
        return combine_slots(w, y, d)

    def scatter_add(w, y):
        z = (w_slots(w)[..., None] * y).reshape(e * cap, -1)
        return jnp.zeros((n + 1, z.shape[-1]), jnp.float32).at[token_flat].add(z)[:n]

    def argsort_segment_sum(w, y):
        z = (w_slots(w)[..., None] * y).reshape(e * cap, -1)
        return jax.ops.segment_sum(z[order], token_flat[order], n + 1, indices_are_sorted=True)[:n]

    def rank_table(w, y):
        y_flat = jnp.concatenate([y.reshape(e * cap, -1), jnp.zeros((1, y.shape[-1]), y.dtype)], 0)
        w_flat = jnp.concatenate([w_slots(w).reshape(-1), jnp.zeros((1,), w.dtype)], 0)
        return jnp.sum(w_flat[table_RxN][..., None] * y_flat[table_RxN], axis=0)

    return {"pair_gather": pair_gather, "shipped_segment_sum": shipped, "scatter_add": scatter_add,
            "argsort_segment_sum": argsort_segment_sum, f"rank_table_R{max_k}": rank_table}


# --- attention -------------------------------------------------------------------------

def attention_variants() -> dict[str, Callable]:
    from onn_jax.nn.attention import causal_attention

    def naive(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return causal_attention(q, k, v, pos, pos)

    out = {"naive": naive}
    for impl in ("xla", "cudnn"):
        out[f"dot_product_attention_{impl}"] = (
            lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
    return out


# --- LM head + cross entropy -------------------------------------------------------------

def head_variants(chunks: tuple[int, ...]) -> dict[str, Callable]:
    from onn_jax.core.losses import next_token_loss

    def full(x, w, targets):
        logits = (x @ w).astype(jnp.float32)
        return next_token_loss(logits[None], targets[None], jnp.ones_like(targets[None], jnp.float32))[0]

    out = {"full_logits": full}
    for n_chunks in chunks:
        def chunked(x, w, targets, n_chunks=n_chunks):
            xs = x.reshape(n_chunks, -1, x.shape[-1])
            ts = targets.reshape(n_chunks, -1)

            @jax.checkpoint
            def one(carry, xt):
                xc, tc = xt
                logits = jnp.dot(xc, w, preferred_element_type=jnp.float32)
                lse = jax.nn.logsumexp(logits, axis=-1)
                tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
                return carry + jnp.sum(lse - tgt), None

            total, _ = jax.lax.scan(one, jnp.zeros([], jnp.float32), (xs, ts))
            return total / x.shape[0]
        out[f"chunked_{n_chunks}"] = chunked
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="combine,attention,head")
    ap.add_argument("--size", default="gpu_large", choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    s = SIZES[args.size]
    dt = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    base = {"size": args.size, "device_kind": jax.devices()[0].device_kind}
    for case in args.cases.split(","):
        if case == "combine":
            d, w, y, max_k = combine_inputs(s)
            run_case("combine", combine_variants(d, max_k), (w, y), args.reps,
                     {**base, "max_k": max_k, "capacity": int(d.token_ExK.shape[1])})
        elif case == "attention":
            ks = jax.random.split(jax.random.key(0), 3)
            shape = (s["b"], s["t"], s["h"], s["c"] // s["h"])
            qkv = tuple(jax.random.normal(k, shape, dt) for k in ks)
            run_case("attention", attention_variants(), qkv, args.reps, {**base, "dtype": str(jnp.dtype(dt))})
        elif case == "head":
            ks = jax.random.split(jax.random.key(0), 2)
            x = jax.random.normal(ks[0], (s["n"], s["c"]), dt)
            w = (jax.random.normal(ks[1], (s["c"], s["v"]), jnp.float32) / np.sqrt(s["c"])).astype(dt)
            targets = jnp.asarray(np.random.default_rng(0).integers(0, s["v"], s["n"]), jnp.int32)
            run_case("head", head_variants((4, 16)), (x, w, targets), args.reps,
                     {**base, "dtype": str(jnp.dtype(dt))})
        else:
            print(f"bench.kernels: --cases: unknown case {case!r}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
