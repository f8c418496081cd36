"""Throughput in the training log: model TFLOP/s per device and MFU (active-expert FLOPs).

The FLOPs per token are onn_jax.training.flops.train_flops_per_token (3 x the forward matmul FLOPs of
the active experts, attention, router and LM head), with k = the step's measured moe/avg_k
for the surprise gate and top_k for the top-k and dense baselines. The device peak is
train.peak_tflops, else onn_jax.training.flops.PEAK_TFLOPS matched by device kind; perf/mfu is null
(None) where the peak is unknown (e.g. CPUs).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from onn_jax.config import Config
from onn_jax.training.flops import device_peak_tflops, train_flops_per_token


def active_k(cfg: Config, row: Mapping[str, Any]) -> float:
    """Experts per token that do model work: measured avg_k (surprise gate) or top_k."""
    m = cfg.model.moe
    if m.router == "surprise" and row.get("moe/avg_k") is not None:
        return float(row["moe/avg_k"])
    return float(m.top_k)


def perf_metrics(cfg: Config, row: Mapping[str, Any], step_time_s: float,
                 num_devices: int | None = None, device_kind: str | None = None) -> dict[str, Any]:
    """{"perf/tflops_per_device": ..., "perf/mfu": ... or None} for one logged interval."""
    n = num_devices or jax.device_count()
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    flops_tok = train_flops_per_token(cfg.model, cfg.data.seq_len, active_k(cfg, row))
    tokens = cfg.data.batch_size * cfg.data.seq_len
    tflops = flops_tok * tokens / max(step_time_s, 1e-12) / n / 1e12
    peak = device_peak_tflops(kind, cfg.train.peak_tflops)
    return {"perf/tflops_per_device": tflops, "perf/mfu": tflops / peak if peak else None}
