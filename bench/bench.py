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
import subprocess
import sys
from typing import Sequence

from bench.components import parse_components
from bench.measure import measure
from bench.modes import MODES, PRESETS, BenchError, load_config, parse_k
from onn_jax.config import ConfigError
from onn_jax.data.tokenizer import ByteTokenizer

MIN_STEPS = 20


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
    ap.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                    help="model.output.loss_chunk: the LM head fused with its cross entropy over N positions "
                         "at a time (no [B, T, V] logits; onn_jax.core.head_loss); 0 assembles the logits")
    ap.add_argument("--scan-layers", action="store_true",
                    help="model.scan_layers=true: the blocks as one scan (each grouped-GEMM kernel compiled once)")
    ap.add_argument("--evolve", action="store_true",
                    help="train with the config's learning rate while timing (the routing drifts); default: "
                         "learning rate 0, so the donated state carried from step to step keeps its forced "
                         "routing (the optimizer still does all its work)")
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
        if args.loss_chunk is not None:  # the config's own check (model.output.loss_chunk), named by the flag
            try:
                dataclasses.replace(cfg.model.output, loss_chunk=args.loss_chunk)
            except ConfigError as e:
                raise BenchError(f"--loss-chunk: {e.message}") from None
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
