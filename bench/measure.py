"""One onn-bench measurement: compile and time one mode with one component; its JSON record.

`measure` builds the mode's model (bench/modes.py) with the component (bench/components.py),
forces or trains its routing, compiles the train step, times --steps waited-for steps and
--steps back-to-back ones, and returns the record the CLI prints (its fields: bench/bench.py's
docstring); `dropless_fields` adds what a dropless dispatch resolved to.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.components import COMPONENTS
from bench.harness import breakdown, hlo_stats, profile_ops, random_batch, saved_residual_gib
from bench.modes import force_thresholds, mode_config, parse_k
from bench.real_routing import corpus_batches, train_for
from onn_jax.config import Config, ModelConfig
from onn_jax.nn.attention import attention_impl
from onn_jax.training.flops import device_peak_tflops, train_flops_per_token
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step


def dropless_fields(model: ModelConfig, num_tokens: int) -> dict[str, Any]:
    """pair_budget, pair_rows and the resolved gemm backend of a dropless run (else None)."""
    m = model.moe
    if m.dispatch != "dropless" or m.router == "dense":
        return {"pair_budget": None, "pair_rows": None, "gemm": None, "token_sum": None}
    from onn_jax.dispatch.dropless import pair_rows
    from onn_jax.dispatch.grouped_gemm import resolve_gemm
    from onn_jax.dispatch.token_sums import resolve_token_sum
    rows = pair_rows(num_tokens, m)
    return {"pair_budget": round(rows / num_tokens, 4), "pair_rows": rows,
            "gemm": resolve_gemm(m.gemm, jnp.dtype(model.dtype)),
            "token_sum": resolve_token_sum(m.token_sum, model.hidden)}


def measure(name: str, cfg: Config, mode: str, args, component: str = "none") -> dict[str, Any]:
    """Compiles and times one mode (with one phase-2 component, bench/components.py); returns
    its JSON record."""
    k = parse_k(args.force_avg_k, cfg.model.moe.num_experts)
    model = mode_config(cfg.model, mode, k, args.capacity_rel, args.surprise, args.dispatch,
                        args.gemm, args.pair_budget)
    model = COMPONENTS[component](model)
    if args.attention:
        model = dataclasses.replace(model, attention=args.attention)
    if args.scan_layers:
        model = dataclasses.replace(model, scan_layers=True)
    if args.token_sum:
        model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, token_sum=args.token_sum))
    if args.loss_chunk is not None:
        model = dataclasses.replace(model, output=dataclasses.replace(model.output, loss_chunk=args.loss_chunk))
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    if args.train_steps:  # real routing: corpus batches, the gate trained below (not forced)
        corpus = corpus_batches(b, t, count=min(args.train_steps, 64) + 4, seed=args.seed)
        train_batches, batches = corpus[:-4], corpus[-4:]
    else:
        batches = [random_batch(rng, b, t, model.vocab_size) for _ in range(4)]
    if k is not None and model.moe.router == "surprise":
        state = state.replace(params=force_thresholds(state.params, model, batches[0]["inputs"], k))
    parts = breakdown(model, state.params, batches[0]) if args.breakdown else {}
    trained = {}
    if args.train_steps:
        t0 = time.perf_counter()
        state, trained = train_for(make_train_step(model, tx), state, train_batches, args.train_steps)
        trained["train_s"] = time.perf_counter() - t0
    # Timed steps run as training runs them: the state donated and carried from step to step. By
    # default the learning rate is 0 (a schedule, so nothing folds it away: the optimizer does
    # all its work), so the parameters and the forced or trained routing stay where they are;
    # --evolve trains with the config's rate instead (the routing then drifts).
    timed_tx = tx if args.evolve else make_optimizer(cfg.optim, learning_rate=lambda count: 0.0 * count)
    if not args.evolve:
        state = state.replace(opt_state=timed_tx.init(state.params))
    step = make_train_step(model, timed_tx, donate=True)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    def run(i):
        nonlocal state
        state, metrics = compiled(state, batches[i % len(batches)])
        return state, metrics

    for i in range(args.warmup):
        run(i)
    jax.block_until_ready(state)
    times, avg_k, dropped = [], [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = run(i)
        jax.block_until_ready(out)
        metrics = out[1]
        times.append(time.perf_counter() - t0)
        avg_k.append(float(metrics.get("moe/avg_k", model.moe.top_k)))
        dropped.append(float(metrics.get("moe/dropped_frac", 0.0)))
    t0 = time.perf_counter()  # back-to-back, as a training loop enqueues steps: host overheads overlap
    for i in range(args.steps):
        out = run(i)
    jax.block_until_ready(out)
    pipelined_s = (time.perf_counter() - t0) / args.steps
    dev = jax.devices()[0]
    step_s = statistics.median(times)
    tokens_s = b * t / step_s
    active_k = float(np.mean(avg_k))
    flops_tok = train_flops_per_token(model, t, active_k)
    peak = device_peak_tflops(dev.device_kind, args.peak_tflops)
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    record = {
        "config": name, "mode": mode, "component": component, "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "batch": b, "seq": t, "router": model.moe.router, "dispatch": model.moe.dispatch,
        "attention": attention_impl(model), "scan_layers": model.scan_layers,
        "loss_chunk": model.output.loss_chunk,
        "surprise": model.moe.surprise if model.moe.router == "surprise" else None,
        "capacity_factor": model.moe.capacity_factor if model.moe.dispatch == "sparse" else None,
        **dropless_fields(model, b * t),
        "step_ms": round(step_s * 1e3, 3), "step_ms_min": round(min(times) * 1e3, 3),
        "step_ms_max": round(max(times) * 1e3, 3), "steps": args.steps,
        "pipelined_step_ms": round(pipelined_s * 1e3, 3),
        "tokens_per_s": round(tokens_s, 1), "avg_k": round(active_k, 3),
        "dropped_frac": round(float(np.mean(dropped)), 5),
        "model_tflop_per_step": round(flops_tok * b * t / 1e12, 4),
        "model_tflops": round(flops_tok * tokens_s / 1e12, 2),
        "mfu": round(flops_tok * tokens_s / (peak * 1e12), 4) if peak else None,
        "pipelined_tokens_per_s": round(b * t / pipelined_s, 1),
        "mfu_pipelined": round(flops_tok * b * t / pipelined_s / (peak * 1e12), 4) if peak else None,
        "peak_tflops": peak,
        "peak_mem_gib": (round(stats["peak_bytes_in_use"] / 2**30, 3)
                         if stats and "peak_bytes_in_use" in stats else None),
        "compile_s": round(compile_s, 2),
        "main_loss": float(metrics["train/main_loss"]),
        "routing": (f"trained {args.train_steps} steps on the builtin corpus" if args.train_steps
                    else f"forced avg_k {k}" if k is not None and model.moe.router == "surprise" else "as initialised"),
    }
    if args.train_steps:
        record["train_steps"] = args.train_steps
        record["train_s"] = round(trained["train_s"], 2)
        record["trained_main_loss"] = trained.get("train/main_loss")
    record.update(parts)
    record["saved_residual_gib"] = saved_residual_gib(model, state.params, batches[0])
    if args.profile:
        record["profile_ms_per_step"] = profile_ops(lambda i: run(i), args.profile_top,
                                                    hlo_text=compiled.as_text())
    record.update(hlo_stats(compiled))
    return record
