"""Range checks every config field gets, on top of its own validation in onn_jax.config.

    check_values(cfg)                    # ConfigError naming the dotted field
    problem = memory_problem(cfg, n)     # None, or (field, message) when one step cannot fit

`check_values` walks the dataclasses (so fields added later are covered too): integers must
fit int32 (shapes, steps and counters are int32 in jax; seeds are 0 <= seed < 2**32), floats
must be finite, strings must be encodable as UTF-8 without NUL (they become file names, JSON
and tokenizer input). A value that passed these checks used to fail late, after the workdir
was written, or hang.

`memory_problem` estimates what one training step holds (parameters, AdamW moments and
gradients in float32, plus the largest activations) and refuses a config that needs more than
the memory of all devices together; it is a lower bound, so a config it passes may still not
fit, but one it refuses never would.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from onn_jax.config import ConfigError

INT32 = 2 ** 31
SEED_FIELDS = ("data.seed", "train.seed")
MAX_RECORDS_PER_DOMAIN = 10 ** 6  # the builtin corpus is built in memory, in Python


def check_values(cfg: Any, prefix: str = "") -> None:
    """Raises ConfigError for the first field out of range (see the module docstring)."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_values(value, name + ".")
        else:
            _check_leaf(value, name)
    if prefix == "" and hasattr(cfg, "data"):
        n = cfg.data.records_per_domain
        if n > MAX_RECORDS_PER_DOMAIN:
            raise ConfigError("data.records_per_domain", f"must be <= {MAX_RECORDS_PER_DOMAIN}, got {n}")


def _check_leaf(value: Any, name: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        lo, hi = (0, 2 ** 32) if name in SEED_FIELDS else (-INT32, INT32)
        if not lo <= value < hi:
            raise ConfigError(name, f"must be in [{lo}, {hi - 1}], got {value}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(name, f"is not valid text (cannot be encoded as UTF-8 at character "
                                    f"{e.start}: {value[e.start:e.end]!r})") from None
        if "\x00" in value:
            raise ConfigError(name, "must not contain a NUL character")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_leaf(v, f"{name}[{i}]")


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
    return {"model.vocab_size": state * embed + 4.0 * tokens * m.vocab_size,  # + the logits
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
