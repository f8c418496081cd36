"""onn-bench-recipe: compile time and memory of the train step under model.remat,
model.scan_layers and optim.accum_steps, one JSON line per variant.

    python -m bench.recipe --preset gpu_large --layers 8,24 --remat none,block,dots --accum 1,2,4
    python -m bench.recipe --preset gpu_large --layers 8,24 --scan false,true --remat none,block --accum 1

Per variant (one model, one remat policy, one k): seconds to lower + compile the guarded train
step, XLA's memory analysis of the compiled step (temp / argument / output bytes: a per-variant
figure, unlike the device's cumulative peak), and, after one step on the device, the device's
peak_bytes_in_use (cumulative in this process; run one variant per process for a clean peak
with --isolate), and the mean time of --steps further steps (step_ms). On CPU the device peak is
null. --budget-s skips (one JSON line each) the variants that would start after that many seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from bench.harness import random_batch
from bench.modes import PRESETS
from onn_jax.config import Config, from_dict
from onn_jax.training.guard import make_guarded_step
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state


def measure(cfg: Config, layers: int, remat: str, accum: int, seed: int = 0, scan: bool = False,
            steps: int = 2) -> dict[str, Any]:
    """Compile time, memory and step time of one variant (see the module docstring)."""
    model = dataclasses.replace(cfg.model, num_layers=layers, remat=remat, scan_layers=scan)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, jax.random.key(seed))
    batch = random_batch(np.random.default_rng(seed), b, t, model.vocab_size)
    step = make_guarded_step(model, tx, donate=False, accum_steps=accum)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    gib = lambda v: None if v is None else round(v / 2**30, 6)
    out = {"layers": layers, "scan_layers": scan, "remat": remat, "accum_steps": accum, "batch": b, "seq_len": t,
           "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 3),
           "temp_gib": gib(getattr(mem, "temp_size_in_bytes", None)),
           "argument_gib": gib(getattr(mem, "argument_size_in_bytes", None)),
           "output_gib": gib(getattr(mem, "output_size_in_bytes", None))}
    jax.block_until_ready(compiled(state, batch))
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_gib"] = gib(stats.get("peak_bytes_in_use"))
    t0 = time.perf_counter()
    for _ in range(steps):  # donate=False: the same state each time
        jax.block_until_ready(compiled(state, batch))
    out["step_ms"] = round((time.perf_counter() - t0) / max(steps, 1) * 1e3, 3) if steps else None
    return out


def bools(text: str, flag: str) -> list[bool]:
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not vals or any(v not in ("true", "false") for v in vals):
        raise SystemExit(f"bench.recipe: {flag}: expected comma-separated true/false, got {text!r}")
    return [v == "true" for v in vals]


def ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"bench.recipe: {flag}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"bench.recipe: {flag}: expected integers >= 1, got {text!r}")
    return vals


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.recipe", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu_large", choices=sorted(PRESETS))
    ap.add_argument("--layers", default="8,24", help="comma-separated layer counts")
    ap.add_argument("--remat", default="none,block,dots", help="comma-separated model.remat values")
    ap.add_argument("--accum", default="1,2,4", help="comma-separated optim.accum_steps values")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--scan", default="false", help="comma-separated model.scan_layers values (true,false)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the first (step_ms)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the variants that would start after this many seconds")
    ap.add_argument("--isolate", action="store_true", help="one process per variant (clean device peak)")
    args = ap.parse_args(argv)
    p = json.loads(json.dumps(PRESETS[args.preset]))
    if args.batch:
        p["data"]["batch_size"] = args.batch
    if args.seq_len:
        p["data"]["seq_len"] = args.seq_len
    cfg = from_dict(Config, p)
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    start = time.perf_counter()
    for layers in ints(args.layers, "--layers"):
        for scan in bools(args.scan, "--scan"):
            for remat in remats:
                for k in ints(args.accum, "--accum"):
                    key = {"layers": layers, "scan_layers": scan, "remat": remat, "accum_steps": k}
                    if cfg.data.batch_size % k:
                        print(json.dumps({**key, "error": f"accum {k} does not divide batch {cfg.data.batch_size}"}))
                        continue
                    if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                        print(json.dumps({**key, "skipped": f"--budget-s {args.budget_s} spent"}), flush=True)
                        continue
                    if args.isolate:
                        argv1 = [sys.executable, "-m", "bench.recipe", "--preset", args.preset, "--layers",
                                 str(layers), "--scan", str(scan).lower(), "--remat", remat, "--accum", str(k),
                                 "--steps", str(args.steps)]
                        argv1 += ["--batch", str(cfg.data.batch_size), "--seq-len", str(cfg.data.seq_len)]
                        subprocess.run(argv1, check=False)
                        continue
                    print(json.dumps(measure(cfg, layers, remat, k, scan=scan, steps=args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
