"""Data- and expert-parallel scaling of the sharded train step: one JSON line per layout.

    PYTHONPATH=. python bench/scaling.py --size gpu_large --layouts 1x1,2x1,4x1,2x2,1x4

A layout DxE runs on the first D*E devices with mesh data=D, expert=E, at a fixed batch per
device (weak scaling), so ideal tokens/s grows linearly with devices; `speedup` and
`efficiency` are relative to the first single-device layout of the same run. `--moe-hook`
adds the activation constraints proposed for onn_jax/moe.py (tokens along data, experts along
expert inside the MoE layer) by wrapping moe's expert/combine functions; `--size smoke` runs
a tiny model (with XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) to check the
script. Needs no orbax.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from onn_jax import moe as moe_module
from onn_jax import sharding as sh
from onn_jax.config import MeshConfig, ModelConfig, MoEConfig, OptimConfig
from onn_jax.step import make_optimizer

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
        x_NxC = sh.constrain(x_NxC, ("moe_batch", "embed"))
        return sh.constrain(expert_outputs(params, x_NxC, kind), ("moe_batch", "expert", "embed"))

    def hooked_combine(weights_NxE, y_NxExC):
        return sh.constrain(combine(weights_NxE, y_NxExC), ("batch", "embed"))

    moe_module.expert_outputs, moe_module.combine = hooked_expert_outputs, hooked_combine


def measure(cfg: ModelConfig, data: int, expert: int, per_device_batch: int, seq: int,
            steps: int, warmup: int) -> dict:
    n = data * expert
    mesh = sh.make_mesh(MeshConfig(data=data, expert=expert), jax.devices()[:n])
    tx = make_optimizer(OptimConfig())
    state = sh.sharded_init(cfg, tx, jax.random.key(0), mesh)
    step = sh.make_sharded_train_step(cfg, tx, mesh)
    rng = np.random.default_rng(0)
    b = per_device_batch * n
    tokens = rng.integers(0, cfg.vocab_size, (b, seq + 1)).astype(np.int32)
    batch = sh.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                            "loss_mask": np.ones((b, seq), np.float32)}, mesh)
    t0 = time.perf_counter()
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
    del state
    return {"devices": n, "data": data, "expert": expert, "global_batch": b, "seq": seq,
            "step_ms": round(1e3 * dt / steps, 2), "tokens_per_s": round(b * seq * steps / dt),
            "first_step_s": round(compile_s, 1), "main_loss": round(loss, 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu_large")
    ap.add_argument("--layouts", default="1x1,2x1,4x1,2x2,1x4", help="comma list of DATAxEXPERT")
    ap.add_argument("--per-device-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--moe-hook", action="store_true", help="constrain MoE tensors (see docstring)")
    ap.add_argument("--attention", choices=("xla", "cudnn", "auto"), default="xla",
                    help="model.attention (xla: the figures in docs/SCALING.md)")
    args = ap.parse_args(argv)
    cfg = SIZES[args.size]
    cfg = dataclasses.replace(cfg, attention=args.attention)
    if args.moe_hook:
        install_moe_hook()
    base = None
    for layout in args.layouts.split(","):
        try:
            data, expert = (int(v) for v in layout.lower().split("x"))
        except ValueError:
            ap.error(f"--layouts: {layout!r} is not DATAxEXPERT (e.g. 2x2)")
        if data * expert > jax.device_count():
            print(json.dumps({"layout": layout, "skipped": f"needs {data * expert} devices, "
                              f"have {jax.device_count()}"}), flush=True)
            continue
        rec = measure(cfg, data, expert, args.per_device_batch, args.seq, args.steps, args.warmup)
        if base is None and rec["devices"] == 1:
            base = rec["tokens_per_s"]
        if base:
            rec["speedup"] = round(rec["tokens_per_s"] / base, 3)
            rec["efficiency"] = round(rec["tokens_per_s"] / base / rec["devices"], 3)
        rec.update(layout=layout, size=args.size, moe_hook=args.moe_hook, attention=args.attention,
                   device_kind=jax.devices()[0].device_kind, jax=jax.__version__)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
