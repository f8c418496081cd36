"""onn-bench: train-step speed of the surprise-gated MoE and its baselines, one JSON line each.

    onn-bench --config configs/gpu_large.py --mode smk,plain,dense,sparse --force-avg-k E/8
    onn-bench --config configs/gpu_large.py --mode smk,plain --dispatch dropless --force-avg-k E/8

Modes (same model size, same batch):
  smk     the default unified step (surprise router, Surprise backward, config's dispatch)
  plain   router=topk + load-balancing loss, no Surprise (top_k = the forced k if given)
  dense   router=dense: a plain FFN of width top_k * intermediate (active-FLOP matched)
  sparse  smk with dispatch=sparse (capacity = capacity_rel * N * k / E slots per expert)
`--dispatch dropless` runs smk and plain on the dropless dispatch (onn_jax.dispatch.dropless) with
`--gemm` and `--pair-budget` (default: top_k for plain, 1.25 k for smk with a forced k, else
the config's); the JSON line reports the budget, the buffer rows and the resolved backend.

`--train-steps N` times real routing instead of forced routing: the unforced model is trained
N steps on the builtin corpus first (bench/real_routing.py), then timed on corpus batches.

`--component none,heads_surprise,...` times each phase-2 component (gated heads, sparse
embeddings, adaptive softmax; bench/components.py) against the same mode without it.

Each line: step time (median over --steps >= 20 timed steps after compilation and warm-up,
each step waited for, none of them synchronising inside; `pipelined_step_ms`: the mean of
--steps steps enqueued back to back, as a training loop runs them), tokens/s, model TFLOP/s
and MFU counting only active-expert FLOPs (formula in `train_flops_per_token`; from the
median, and `*_pipelined` from the back-to-back mean), peak device memory (memory_stats,
per mode in its own process), XLA's own FLOP count and compile time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.components import COMPONENTS, parse_components
from bench.real_routing import corpus_batches, train_for
from onn_jax.config import Config, ModelConfig, MoEConfig
from onn_jax.core.losses import next_token_loss
from onn_jax.data.tokenizer import ByteTokenizer
from onn_jax.nn.attention import attention_impl
from onn_jax.nn.transformer import Transformer
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, make_train_step

MODES = ("smk", "plain", "dense", "sparse")
MIN_STEPS = 20

# Dense bf16 tensor-core peak in TFLOP/s, matched as a substring of jax's device_kind.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
               "TPU v4": 275.0, "TPU v6": 918.0}

PRESETS = {  # built-in sizes (the same as configs/*.py), usable without a config file
    "tiny": dict(model=dict(vocab_size=262, hidden=32, num_layers=1, num_heads=4, max_len=64,
                            moe=dict(num_experts=4, intermediate=32)),
                 data=dict(batch_size=8, seq_len=64)),
    "gpu_large": dict(model=dict(vocab_size=32000, hidden=512, num_layers=8, num_heads=8, max_len=512,
                                 dtype="bfloat16", attention="auto", moe=dict(num_experts=64, intermediate=256)),
                      data=dict(batch_size=32, seq_len=512)),
    "gpu_small_b16": dict(model=dict(vocab_size=32000, hidden=256, num_layers=4, num_heads=4, max_len=512,
                                     dtype="bfloat16", attention="auto",
                                     moe=dict(num_experts=32, intermediate=256)),
                          data=dict(batch_size=16, seq_len=256)),  # gpu_small's model, batch 16 x 256
}


class BenchError(ValueError):
    """A bad command-line value; the message names the flag."""


def load_config(args) -> tuple[str, Config]:
    """(name, Config) from --config FILE (through the training program's loader) or --preset."""
    if args.config:
        from train.common.config_loader import load  # the training program's loader: same errors, same files
        return os.path.splitext(os.path.basename(args.config))[0], load(args.config)
    if args.preset not in PRESETS:
        raise BenchError(f"--preset: unknown preset {args.preset!r}; known: {sorted(PRESETS)}")
    p = PRESETS[args.preset]
    moe = MoEConfig(**p["model"]["moe"])
    model = ModelConfig(**{**p["model"], "moe": moe})
    data = dataclasses.replace(Config().data, **p["data"])
    return args.preset, Config(model=model, data=data)


def parse_k(text: str | None, num_experts: int) -> int | None:
    """'E/8' -> num_experts // 8; '6' -> 6; None -> None."""
    if text is None:
        return None
    try:
        k = num_experts // int(text[2:]) if text.upper().startswith("E/") else int(text)
    except (ValueError, ZeroDivisionError):
        raise BenchError(f"--force-avg-k: expected an integer or E/n, got {text!r}") from None
    if not 1 <= k <= num_experts:
        raise BenchError(f"--force-avg-k: {text!r} gives k={k}, outside 1..{num_experts}")
    return k


def mode_config(model: ModelConfig, mode: str, k: int | None, capacity_rel: float,
                surprise: str | None, dispatch: str | None = None, gemm: str | None = None,
                pair_budget: float | None = None) -> ModelConfig:
    """The model config a mode runs: the same sizes, a different router / dispatch."""
    m = model.moe
    if dispatch == "dropless" and mode in ("smk", "plain"):
        budget = pair_budget or m.pair_budget
        if budget is None and mode == "smk" and k is not None:
            budget = min(float(m.num_experts), 1.25 * k)
        if mode == "plain" and pair_budget is None:
            budget = None  # top_k rows per token: exact
        m = dataclasses.replace(m, dispatch="dropless", pair_budget=budget, gemm=gemm or m.gemm)
    if dispatch == "sparse" and mode in ("smk", "plain"):  # capacity_rel * N * k / E slots
        k_rel = 1.0 if mode == "plain" else (k or m.effective_fallback_k) / m.effective_fallback_k
        m = dataclasses.replace(m, dispatch="sparse", capacity_factor=m.capacity_factor or capacity_rel * k_rel)
    top_k = k if k is not None else m.top_k
    if mode == "smk":
        moe = m
    elif mode == "plain":
        moe = dataclasses.replace(m, router="topk", top_k=top_k)
    elif mode == "dense":
        moe = dataclasses.replace(m, router="dense", top_k=top_k)
    elif mode == "sparse":
        k_target = k if k is not None else m.effective_fallback_k
        cf = m.capacity_factor or capacity_rel * k_target / m.effective_fallback_k
        moe = dataclasses.replace(m, dispatch="sparse", capacity_factor=cf)
    else:
        raise BenchError(f"--mode: unknown mode {mode!r}; known: {list(MODES)}")
    if surprise and moe.router == "surprise":
        moe = dataclasses.replace(moe, surprise=surprise)
    return dataclasses.replace(model, moe=moe)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, active_k: float) -> float:
    """Model FLOPs of one training step per token: 3 x (forward matmul FLOPs).

    forward = 2 * [L * (4 C^2 + C E + k * m * C * I) + C V] + L * 4 * T * C
    (attention projections, router, the k active experts with m = 2 (GELU) or 3 (SwiGLU)
    matrices, LM head; then QK^T and PV over all T keys). The dense FFN counts k = top_k
    with no router. Inactive experts computed by the dense dispatch and the Surprise
    backward are not counted: they are overhead, not model work.
    """
    c, m, L = cfg.hidden, cfg.moe, cfg.num_layers
    mats = 3 if m.expert_kind == "swiglu" else 2
    router = 0 if m.router == "dense" else c * m.num_experts
    per_layer = 4 * c * c + router + active_k * mats * c * m.intermediate
    return 3.0 * (2.0 * (L * per_layer + c * cfg.vocab_size) + L * 4.0 * seq_len * c)


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
    tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def force_thresholds(params, cfg: ModelConfig, inputs: jax.Array, k: int, rounds: int = 3):
    """Sets each expert's threshold to the (1 - k/E) quantile of its cosine logits on `inputs`,
    so that about k experts pass per token (layer by layer; repeated as routing feeds forward)."""
    e = cfg.moe.num_experts
    apply = jax.jit(lambda p: [r.router.logits for r in Transformer(cfg).apply({"params": p}, inputs)[1]])
    from onn_jax.nn.layer_stack import to_layout
    for _ in range(rounds):
        logits = apply(params)
        params = to_layout(params, False)  # model.scan_layers: edit per layer, then stack again
        for i, logits_NxE in enumerate(logits):
            q_E = jnp.clip(jnp.quantile(logits_NxE, 1.0 - k / e, axis=0), 1e-4, 1 - 1e-4)
            block = dict(params[f"block_{i}"])
            block["moe"] = {**block["moe"], "thresholds": jnp.log(q_E / (1 - q_E))}
            params = {**params, f"block_{i}": block}
        params = to_layout(params, cfg.scan_layers)
    return params


def device_peak_tflops(kind: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


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


def profile_ops(run, top: int, steps: int = 3, devices: int = 1) -> dict:
    """Device time per step (ms) of the costliest XLA ops and op kinds, from a jax.profiler trace;
    with `devices` > 1 (a mesh) the times summed over the devices' planes are divided by it, so
    the figures are per device."""
    import glob
    import re
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
    return {"total_ms": round(sum(ops.values()) / steps / devices / 1e6, 3), "kinds": per_step(kinds),
            "ops": per_step(ops), "lines": sorted(set(seen))} if ops else {"lines": seen}


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
    step = make_train_step(model, tx, donate=args.evolve)
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    trained = {}
    if args.train_steps:
        t0 = time.perf_counter()
        state, trained = train_for(compiled, state, train_batches, args.train_steps)
        trained["train_s"] = time.perf_counter() - t0
    state0 = state

    def run(i):  # --evolve carries the state (routing drifts); else every step starts from state0
        nonlocal state
        new, metrics = compiled(state if args.evolve else state0, batches[i % len(batches)])
        if args.evolve:
            state = new
        return new, metrics

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
    if args.profile:
        record["profile_ms_per_step"] = profile_ops(lambda i: run(i), args.profile_top)
    record.update(hlo_stats(compiled))
    return record


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onn-bench", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config file (configs/NAME.py)")
    src.add_argument("--preset", help=f"a built-in size: {sorted(PRESETS)}")
    ap.add_argument("--mode", default="smk", help=f"comma-separated modes from {list(MODES)}")
    ap.add_argument("--steps", type=int, default=30, help=f"timed steps (>= {MIN_STEPS}); median reported")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (TFLOP/s)")
    ap.add_argument("--force-avg-k", default=None,
                    help="set the thresholds so that about k experts pass per token (int or E/n); "
                         "plain and dense then use top_k = k")
    ap.add_argument("--capacity-rel", type=float, default=1.25,
                    help="sparse mode: slots per expert = capacity_rel * N * k / E (unless the config sets "
                         "model.moe.capacity_factor)")
    ap.add_argument("--surprise", default=None, help="surprise function for smk/sparse (e.g. output_grad_closed)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the forward alone and the gradient without the optimizer")
    ap.add_argument("--dispatch", choices=("dense", "sparse", "dropless"), default=None,
                    help="override the dispatch of smk and plain (sparse capacity as for --mode sparse)")
    ap.add_argument("--gemm", choices=("auto", "ragged_dot", "mosaic_gpu", "padded"), default=None,
                    help="dropless: grouped-GEMM backend (model.moe.gemm)")
    ap.add_argument("--pair-budget", type=float, default=None,
                    help="dropless: pair rows per token (model.moe.pair_budget)")
    ap.add_argument("--component", default="none",
                    help="comma list of phase-2 components to time against `none` (bench/components.py)")
    ap.add_argument("--token-sum", choices=("auto", "loop", "pallas"), default=None,
                    help="dropless: per-token sums (model.moe.token_sum; onn_jax.dispatch.token_sums)")
    ap.add_argument("--attention", choices=("xla", "cudnn", "auto"), default=None,
                    help="override model.attention (training attention: einsums or cuDNN flash)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="model.scan_layers=true: the blocks as one scan (each grouped-GEMM kernel compiled once)")
    ap.add_argument("--evolve", action="store_true",
                    help="carry the state from step to step (donated; routing drifts); default: every "
                         "timed step starts from the same state, so avg_k stays where it was forced")
    ap.add_argument("--train-steps", type=int, default=0, metavar="N",
                    help="real routing: train the unforced model N steps on the builtin corpus, then time "
                         "it on corpus batches (bench/real_routing.py); not with --force-avg-k")
    ap.add_argument("--profile", action="store_true", help="add the costliest XLA ops per step (jax.profiler)")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-isolate", action="store_true",
                    help="run all modes in this process (peak memory is then cumulative)")
    return ap


def child_argv(argv: Sequence[str], mode: str) -> list[str]:
    """argv with --mode replaced by one mode and --no-isolate added."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--mode":
            skip = True
            continue
        if a.startswith("--mode="):
            continue
        out.append(a)
    return out + ["--mode", mode, "--no-isolate"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        modes = [m.strip() for m in args.mode.split(",") if m.strip()]
        for m in modes:
            if m not in MODES:
                raise BenchError(f"--mode: unknown mode {m!r}; known: {list(MODES)}")
        if args.steps < MIN_STEPS:
            raise BenchError(f"--steps: must be >= {MIN_STEPS}, got {args.steps}")
        name, cfg = load_config(args)
        parse_k(args.force_avg_k, cfg.model.moe.num_experts)
        if args.train_steps < 0:
            raise BenchError(f"--train-steps: must be >= 0, got {args.train_steps}")
        if args.train_steps and args.force_avg_k is not None:
            raise BenchError("--train-steps: real routing is trained, not forced; drop --force-avg-k")
        if args.train_steps and cfg.model.vocab_size < ByteTokenizer().vocab_size:
            raise BenchError(f"--train-steps: the builtin corpus needs model.vocab_size >= "
                             f"{ByteTokenizer().vocab_size} (byte tokens), got {cfg.model.vocab_size}")
        components = parse_components(args.component)
    except (BenchError, ValueError) as e:
        print(f"onn-bench: {e}", file=sys.stderr)
        return 2
    if len(modes) > 1 and not args.no_isolate:  # one process per mode: clean peak memory, no OOM carry-over
        rc = 0
        for m in modes:
            p = subprocess.run([sys.executable, "-m", "bench.bench", *child_argv(argv, m)],
                               stdout=subprocess.PIPE, text=True)
            sys.stdout.write(p.stdout)
            sys.stdout.flush()
            if p.returncode != 0:
                print(json.dumps({"config": name, "mode": m, "error": f"exit code {p.returncode}"}), flush=True)
                rc = 1
        return rc
    rc = 0
    for m in modes:
        for c in components:
            try:
                record = measure(name, cfg, m, args, c)
            except Exception as e:  # e.g. out of memory: report it and go on with the next one
                record, rc = {"config": name, "mode": m, "component": c,
                              "error": f"{type(e).__name__}: {str(e)[:500]}"}, 1
            print(json.dumps(record), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
