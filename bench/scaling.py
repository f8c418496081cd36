"""Data- and expert-parallel scaling of the sharded train step: one JSON line per layout.

    PYTHONPATH=. python bench/scaling.py --size gpu_large --layouts 1x1,2x1,4x1,2x2,1x4

A layout DxE runs on the first D*E devices with mesh data=D, expert=E, at a fixed batch per
device (weak scaling), so ideal tokens/s grows linearly with devices; `speedup` and
`efficiency` are relative to the first single-device layout of the same run. `--moe-hook`
adds the activation constraints proposed for onn_jax/nn/moe.py (tokens along data, experts along
expert inside the MoE layer) by wrapping moe's expert/combine functions; `--size smoke` runs
a tiny model (with XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) to check the
script. Needs no orbax.

`--scan-layers` and `--remat` set model.scan_layers / model.remat (the Mosaic GPU grouped GEMM
needs the scan to compile in reasonable time at gpu_large).
`--mode smk|plain`, `--dispatch dense|sparse|dropless`, `--pair-budget`, `--gemm` and
`--force-avg-k E/8` pick the router and the MoE dispatch as onn-bench does (bench.modes.mode_config;
the thresholds are forced on the batch so about k experts pass per token). Each record carries the
compiled step's memory per device (XLA's memory_analysis: arguments + temporaries + outputs -
aliased) and, with `--profile`, the costliest XLA ops per step and device; with `--check`, the
relative error of the mesh step against the same step on one device (same init, same global
batch): main loss and updated parameters.

A layout with expert > 1 and `--dispatch dropless` runs the expert-parallel layer
(onn_jax.dispatch.expert_parallel: each GPU holds E / expert experts, pairs travel by all_to_all);
`--ep-budget` sets model.moe.ep_budget (rows per token sent to each peer; default
min(pair budget, E / expert), which adds no drop). Its records carry `ep_send_rows` (S per
peer per device). `--per-device-batch` takes a comma list (one run each, one process). A
layout that fails prints a JSON record with `error` and the run goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/scaling.py`: import bench.* from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import jax
import numpy as np

from bench.harness import profile_ops
from bench.modes import force_thresholds, mode_config, parse_k
from onn_jax.config import MeshConfig, ModelConfig, MoEConfig, OptimConfig
from onn_jax.nn import moe as moe_module
from onn_jax.parallel.constrain import constrain
from onn_jax.parallel.mesh import make_mesh
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import make_sharded_train_step, shard_batch, sharded_init

SIZES = {  # as configs/gpu_small.py and configs/gpu_large.py (model part)
    "smoke": ModelConfig(vocab_size=256, hidden=32, num_layers=1, num_heads=4, max_len=64,
                         moe=MoEConfig(num_experts=8, intermediate=32)),
    "gpu_small": ModelConfig(vocab_size=32000, hidden=256, num_layers=4, num_heads=4, max_len=512,
                             dtype="bfloat16", moe=MoEConfig(num_experts=32, intermediate=256)),
    "gpu_large": ModelConfig(vocab_size=32000, hidden=512, num_layers=8, num_heads=8, max_len=512,
                             dtype="bfloat16", moe=MoEConfig(num_experts=64, intermediate=256)),
}


def install_moe_hook() -> None:
    """Constrains the MoE layer's tensors: x [N, C] and Y [N, E, C] with tokens along
    data/fsdp and experts along expert; the combined output back along the batch axes."""
    expert_outputs, combine = moe_module.expert_outputs, moe_module.combine

    def hooked_expert_outputs(params, x_NxC, kind="gelu"):
        x_NxC = constrain(x_NxC, ("moe_batch", "embed"))
        return constrain(expert_outputs(params, x_NxC, kind), ("moe_batch", "expert", "embed"))

    def hooked_combine(weights_NxE, y_NxExC):
        return constrain(combine(weights_NxE, y_NxExC), ("batch", "embed"))

    moe_module.expert_outputs, moe_module.combine = hooked_expert_outputs, hooked_combine


def step_memory_bytes(step, state, batch) -> int | None:
    """Device memory of one compiled step per device (arguments + temporaries + outputs - aliased)."""
    return compiled_memory_bytes(step.lower(state, batch).compile())


def compiled_memory_bytes(compiled) -> int | None:
    """step_memory_bytes of an already compiled step."""
    try:
        mem = compiled.memory_analysis()
        return int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes)
    except Exception:  # a backend without memory_analysis
        return None


def make_batch(cfg: ModelConfig, global_batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (global_batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((global_batch, seq), np.float32)}


_FORCED: dict = {}  # (cfg, k, rows) -> host params with forced thresholds (a mesh's init equals one device's)
_REFERENCE: dict = {}  # (cfg, k, global batch) -> the one-device step of --check, shared by the layouts


def init_on_mesh(cfg: ModelConfig, tx, mesh, batch: dict, k: int | None):
    """The sharded initial state; with k, thresholds forced so about k experts pass per token
    (forced once per config and batch in a process: the sharded init is the one-device init)."""
    state = sharded_init(cfg, tx, jax.random.key(0), mesh)
    if k is not None and cfg.moe.router == "surprise":
        rows = np.asarray(batch["inputs"][:64])
        key = (cfg, k, rows.tobytes())
        if key not in _FORCED:
            _FORCED[key] = jax.device_get(  # on the host: the donated step must not delete it
                force_thresholds(jax.device_get(state.params), cfg, jax.numpy.asarray(rows), k))
        params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), _FORCED[key], state.params)
        state = state.replace(params=params)
    return state


def one_step(cfg: ModelConfig, data: int, expert: int, batch: dict, k: int | None):
    """Loss and updated params (host) of one step on a data x expert mesh, not donated."""
    mesh = make_mesh(MeshConfig(data=data, expert=expert), jax.devices()[:data * expert])
    tx = make_optimizer(OptimConfig())
    state = init_on_mesh(cfg, tx, mesh, batch, k)
    step = make_sharded_train_step(cfg, tx, mesh, donate=False)
    new, metrics = step(state, shard_batch(batch, mesh))
    return float(metrics["train/main_loss"]), jax.device_get(new.params)


def check_against_one_device(cfg: ModelConfig, data: int, expert: int, batch: dict, k: int | None) -> dict:
    """Relative errors of one mesh step against the same step on the first device (computed
    once per config and global batch in a process, then shared by the layouts checked)."""
    key = (cfg, k, batch["inputs"].shape)
    if key not in _REFERENCE:
        _REFERENCE[key] = one_step(cfg, 1, 1, batch, k)
    loss_1, params_1 = _REFERENCE[key]
    loss_n, params_n = one_step(cfg, data, expert, batch, k)
    num = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
              for a, b in zip(jax.tree.leaves(params_n), jax.tree.leaves(params_1)))
    den = max(float(np.max(np.abs(np.asarray(b, np.float64)))) for b in jax.tree.leaves(params_1))
    return {"check_loss_rel_err": abs(loss_n - loss_1) / max(abs(loss_1), 1e-30),
            "check_params_rel_err": num / max(den, 1e-30)}


def measure(cfg: ModelConfig, data: int, expert: int, per_device_batch: int, seq: int,
            steps: int, warmup: int, k: int | None = None, profile_top: int = 0) -> dict:
    n = data * expert
    mesh = make_mesh(MeshConfig(data=data, expert=expert), jax.devices()[:n])
    tx = make_optimizer(OptimConfig())
    b = per_device_batch * n
    host_batch = make_batch(cfg, b, seq)
    state = init_on_mesh(cfg, tx, mesh, host_batch, k)
    batch = shard_batch(host_batch, mesh)
    t0 = time.perf_counter()
    step = make_sharded_train_step(cfg, tx, mesh).lower(state, batch).compile()  # compiled once
    mem = compiled_memory_bytes(step)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t0
    loss = float(metrics["train/main_loss"])
    extra = {key: round(float(metrics[key]), 4) for key in ("moe/avg_k", "moe/dropped_frac") if key in metrics}
    if profile_top:  # the costliest ops per step and device, from a trace of 3 more steps
        def run(_):
            nonlocal state, metrics
            state, metrics = step(state, batch)
            return metrics
        extra["profile_ms_per_step"] = profile_ops(run, profile_top, devices=n)
    if expert > 1 and cfg.moe.dispatch == "dropless":
        from onn_jax.dispatch.expert_parallel import send_rows
        extra["ep_send_rows"] = send_rows(b * seq // n, cfg.moe, expert)
    del state
    return {"devices": n, "data": data, "expert": expert, "global_batch": b, "seq": seq,
            "step_ms": round(1e3 * dt / steps, 2), "tokens_per_s": round(b * seq * steps / dt),
            "first_step_s": round(compile_s, 1), "main_loss": round(loss, 4),
            "step_memory_gib_per_device": None if mem is None else round(mem / 2**30, 2), **extra}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu_large")
    ap.add_argument("--layouts", default="1x1,2x1,4x1,2x2,1x4", help="comma list of DATAxEXPERT")
    ap.add_argument("--per-device-batch", default="8", help="sequences per device; a comma list runs each")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--moe-hook", action="store_true", help="constrain MoE tensors (see docstring)")
    ap.add_argument("--attention", choices=("xla", "cudnn", "auto"), default="xla",
                    help="model.attention (xla: the figures in docs/SCALING.md)")
    ap.add_argument("--mode", choices=("smk", "plain"), default="smk",
                    help="smk: the surprise gate (default); plain: top-k router with load balancing")
    ap.add_argument("--dispatch", choices=("dense", "sparse", "dropless"), default="dense")
    ap.add_argument("--pair-budget", type=float, default=None, help="dropless rows per token")
    ap.add_argument("--ep-budget", type=float, default=None,
                    help="model.moe.ep_budget: rows per token sent to each expert-parallel peer")
    ap.add_argument("--gemm", choices=("auto", "ragged_dot", "mosaic_gpu", "padded"), default=None,
                    help="model.moe.gemm of the dropless experts (default: the config's, auto)")
    ap.add_argument("--token-sum", choices=("auto", "loop", "pallas"), default=None,
                    help="model.moe.token_sum of the dropless per-token sums (default: the config's, auto)")
    ap.add_argument("--capacity-rel", type=float, default=1.25, help="sparse capacity, as onn-bench")
    ap.add_argument("--force-avg-k", default=None, metavar="K|E/n",
                    help="force about K active experts per token (smk: thresholds; plain: top_k)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="model.scan_layers=true (the blocks as one scan: each Mosaic GPU kernel compiled once)")
    ap.add_argument("--remat", choices=("none", "block", "dots"), default=None, help="model.remat")
    ap.add_argument("--profile", action="store_true",
                    help="add the costliest XLA ops per step and device (jax.profiler; 3 more steps)")
    ap.add_argument("--profile-top", type=int, default=16)
    ap.add_argument("--check", action="store_true",
                    help="also report the mesh step's relative error against one device")
    args = ap.parse_args(argv)
    cfg = SIZES[args.size]
    k = parse_k(args.force_avg_k, cfg.moe.num_experts)
    cfg = mode_config(cfg, args.mode, k, args.capacity_rel, None,
                      None if args.dispatch == "dense" else args.dispatch, args.gemm, args.pair_budget)
    cfg = dataclasses.replace(cfg, attention=args.attention,
                              moe=dataclasses.replace(cfg.moe, ep_budget=args.ep_budget,
                                                      token_sum=args.token_sum or cfg.moe.token_sum))
    if args.scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=True)
    if args.remat:
        cfg = dataclasses.replace(cfg, remat=args.remat)
    try:
        batches = [int(v) for v in args.per_device_batch.split(",")]
    except ValueError:
        ap.error(f"--per-device-batch: {args.per_device_batch!r} is not a comma list of integers")
    if args.moe_hook:
        install_moe_hook()
    for per_device in batches:
        run_layouts(cfg, args, per_device, k)


def run_layouts(cfg: ModelConfig, args, per_device: int, k: int | None) -> None:
    """One JSON line per layout at `per_device` sequences per device."""
    base = None
    for layout in args.layouts.split(","):
        try:
            data, expert = (int(v) for v in layout.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--layouts: {layout!r} is not DATAxEXPERT (e.g. 2x2)") from None
        common = dict(layout=layout, size=args.size, mode=args.mode, dispatch=cfg.moe.dispatch,
                      per_device_batch=per_device, pair_budget=cfg.moe.pair_budget,
                      ep_budget=cfg.moe.ep_budget, gemm=cfg.moe.gemm, token_sum=cfg.moe.token_sum,
                      force_avg_k=args.force_avg_k,
                      moe_hook=args.moe_hook, attention=args.attention,
                      scan_layers=cfg.scan_layers, remat=cfg.remat,
                      device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
        if data * expert > jax.device_count():
            print(json.dumps({"layout": layout, "skipped": f"needs {data * expert} devices, "
                              f"have {jax.device_count()}"}), flush=True)
            continue
        try:
            rec = measure(cfg, data, expert, per_device, args.seq, args.steps, args.warmup, k,
                          args.profile_top if args.profile else 0)
            if args.check and rec["devices"] > 1:
                rec.update({key: float(f"{v:.3g}") for key, v in check_against_one_device(
                    cfg, data, expert, make_batch(cfg, per_device * rec["devices"], args.seq), k).items()})
        except Exception as e:  # one failing layout (compile error, out of memory) ends only itself
            print(json.dumps({**common, "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
            continue
        if base is None and rec["devices"] == 1:
            base = rec["tokens_per_s"]
        if base:
            rec["speedup"] = round(rec["tokens_per_s"] / base, 3)
            rec["efficiency"] = round(rec["tokens_per_s"] / base / rec["devices"], 3)
        rec.update(common)
        print(json.dumps(rec), flush=True)

if __name__ == "__main__":
    main()
