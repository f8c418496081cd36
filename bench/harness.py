"""Timing tools: waited-for wall time of a jitted function, XLA's own counts, profiles, inputs.

`time_fn` (median of waited-for calls; bench/kernels.py and bench/gemm_tune.py time with it
too), `breakdown` (forward alone, gradient alone), `hlo_stats` (XLA's FLOP and matmul counts,
host callbacks, compiled temp memory), `saved_residual_gib` (what the backward keeps),
`profile_ops` (device time per XLA op from a jax.profiler trace; also bench/scaling.py's) and
`random_batch` (uniform random tokens).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from bench.attribution import attribute
from onn_jax.config import ModelConfig
from onn_jax.core.losses import next_token_loss
from onn_jax.nn.transformer import Transformer
from onn_jax.training.step import compute_grads, forward_loss, step_taps


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
    tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def hlo_stats(compiled) -> dict[str, Any]:
    """XLA's FLOP count, matmul count and host-callback count of the compiled step."""
    out: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_tflop_per_step"] = float(cost.get("flops", float("nan"))) / 1e12
    except Exception:  # cost analysis is best effort on some backends
        out["xla_tflop_per_step"] = None
    text = compiled.as_text()
    out["matmuls"] = text.count(" dot(") + text.count("custom_call_target=\"__cublas")
    out["host_callbacks"] = text.count("xla_python_cpu_callback") + text.count("xla_python_gpu_callback") \
        + text.count("xla_ffi_python")
    try:
        mem = compiled.memory_analysis()
        out["compiled_temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 3)
    except Exception:
        out["compiled_temp_gib"] = None
    return out


def saved_residual_gib(model: ModelConfig, params, batch) -> float:
    """GiB that the step's backward keeps from its forward (jax.ad_checkpoint's saved residuals
    of the main loss, parameters and inputs excluded): what the step holds at its peak besides
    the state and the gradients. Exact and the same on every backend (what XLA adds or fuses
    aside); einsum attention (`attention: xla`) keeps [B, H, T, T] arrays that cuDNN does not."""
    b, t = batch["inputs"].shape
    taps = step_taps(model, b, t)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(lambda p, tp: forward_loss(model, Transformer(model), p, batch, tp, None)[0],
                              params, taps)
    width = {"f64": 8, "i64": 8, "u64": 8, "f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "i16": 2, "u16": 2}
    total = 0
    for m in re.finditer(r"^(\w+)\[([\d,]*)\] (.*)$", text.getvalue(), re.M):
        if "from the argument" not in m.group(3):  # bool, i8, u8: one byte
            total += int(np.prod([int(d) for d in m.group(2).split(",") if d])) * width.get(m.group(1), 1)
    return round(total / 2**30, 3)


def time_fn(fn, *args, reps: int = 10) -> float:
    """Median wall time (ms) of a jitted function over `reps` waited-for calls, after one."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def breakdown(model: ModelConfig, params, batch) -> dict[str, float]:
    """Where a step's time goes: forward (main loss only) and the gradient (no optimizer)."""
    def loss(p):
        logits, _ = Transformer(model).apply({"params": p}, batch["inputs"])
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]
    return {"forward_ms": time_fn(jax.jit(loss), params),
            "grads_ms": time_fn(jax.jit(lambda p: compute_grads(p, batch, model)), params)}


def profile_ops(run, top: int, steps: int = 3, devices: int = 1, hlo_text: str | None = None) -> dict:
    """Device time per step (ms) of the costliest XLA ops and op kinds, from a jax.profiler trace;
    with `devices` > 1 (a mesh) the times summed over the devices' planes are divided by it, so
    the figures are per device. With the compiled step's `hlo_text`, also the time by JAX name
    stack and primitive (bench/attribution.py)."""
    import glob
    import tempfile
    from collections import Counter
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for i in range(steps):
                jax.block_until_ready(run(i))
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
    ops, kinds, seen = Counter(), Counter(), []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            seen.append(line.name)
            if line.name == "XLA Ops" or line.name.startswith("Stream"):
                for ev in line.events:
                    ops[ev.name] += ev.duration_ns
                    kinds[re.sub(r"[._]\d+$", "", ev.name)] += ev.duration_ns
    per_step = lambda c: [[n, round(ns / steps / devices / 1e6, 3)] for n, ns in c.most_common(top)]
    if not ops:
        return {"lines": seen}
    out = {"total_ms": round(sum(ops.values()) / steps / devices / 1e6, 3), "kinds": per_step(kinds),
           "ops": per_step(ops), "lines": sorted(set(seen))}
    if hlo_text is not None:
        out["attribution"] = attribute(ops, hlo_text, steps * devices, top=2 * top)
    return out
