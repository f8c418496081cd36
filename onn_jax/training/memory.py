"""A lower-bound estimate of one training step's memory, checked against the devices' memory
before anything is compiled (onn-train refuses a config that can never fit).
"""
from __future__ import annotations

import os
from typing import Any


def device_memory_bytes(devices) -> int | None:
    """Total memory of `devices`: their bytes_limit (GPU/TPU), else the host's RAM (CPU)."""
    total = 0
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory_stats
            stats = {}
        limit = stats.get("bytes_limit")
        if not limit:
            try:
                return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # CPU: one host's RAM
            except (ValueError, OSError, AttributeError):
                return None
        total += int(limit)
    return total or None


def step_bytes(cfg: Any) -> dict[str, float]:
    """Lower-bound float32 bytes of one training step, by the field that drives each part."""
    m, d = cfg.model, cfg.data
    c, e, i, L = m.hidden, m.moe.num_experts, m.moe.intermediate, m.num_layers
    mult = 3 if m.moe.expert_kind == "swiglu" else 2
    experts = L * e * mult * c * i
    embed = 2 * m.vocab_size * c  # embedding + untied head
    attn = L * 4 * c * c
    state = 4.0 * 4  # params + 2 AdamW moments + gradients, float32
    tokens = d.batch_size * d.seq_len
    width = e * (c + i) if m.moe.dispatch == "dense" else m.moe.top_k * (c + i)
    chunk = m.output.loss_chunk  # the fused head holds the logits of one chunk of positions at a time
    logit_rows = d.batch_size * min(chunk, d.seq_len) if chunk else tokens
    return {"model.vocab_size": state * embed + 4.0 * logit_rows * m.vocab_size,  # + the logits
            "model.moe.num_experts": state * experts, "model.hidden": state * attn,
            "data.batch_size": 4.0 * tokens * L * width}  # expert inputs/outputs per layer


def memory_problem(cfg: Any, devices) -> tuple[str, str] | None:
    """(field, message) when one step of `cfg` cannot fit the devices' memory, else None."""
    have = device_memory_bytes(devices)
    if not have:
        return None
    parts = step_bytes(cfg)
    need = sum(parts.values())
    if need <= have:
        return None
    field = max(parts, key=parts.get)
    return field, (f"one training step needs at least {need / 2 ** 30:.1f} GiB (parameters, optimizer state "
                   f"and activations in float32; {field} drives most of it), more than the "
                   f"{have / 2 ** 30:.1f} GiB of memory of {len(devices)} device(s)")
