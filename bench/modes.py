"""What onn-bench runs: the model config of each mode, the built-in sizes, forced routing.

A mode is the same model size with another router / dispatch (`mode_config`: smk, plain,
dense, sparse; `--dispatch` sparse / dropless); `load_config` reads --config FILE through
the training program's loader or takes a --preset; `force_thresholds` sets the surprise
router's thresholds so that about k experts pass per token (`--force-avg-k`, `parse_k`).
bench/scaling.py picks its configs here too, so both benchmarks run the same models.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from onn_jax.config import Config, ModelConfig, MoEConfig
from onn_jax.nn.transformer import Transformer

MODES = ("smk", "plain", "dense", "sparse")

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
    "gpu_olmoe": dict(model=dict(vocab_size=50304, hidden=2048, num_layers=4, num_heads=16, max_len=2048,
                                 norm="rmsnorm", final_norm=True, dtype="bfloat16", attention="auto",
                                 scan_layers=True,
                                 moe=dict(num_experts=64, intermediate=1024, top_k=8, dispatch="dropless")),
                      data=dict(batch_size=8, seq_len=2048)),  # configs/gpu_olmoe.py
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
