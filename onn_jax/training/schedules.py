"""Learning-rate schedules from optax, picked by optim.schedule.

    lr = make_schedule(optim_cfg, total_steps)   # a float (constant) or an optax schedule

The schedule is a function of AdamW's update count c (0 at the first update), so a resumed
run, whose optimizer state holds c, continues it exactly. With peak = optim.lr,
end = peak * min_lr_ratio, W = warmup_steps and D = decay_steps (default: the run length):
  constant       peak (faithful; returned as a plain float, so the optimizer is unchanged)
  warmup_cosine  0 -> peak linearly over W, then cosine from peak to end at step D
  linear         0 -> peak linearly over W, then linearly from peak to end at step D
  wsd            0 -> peak over W, peak until D - ceil(cooldown_fraction * D), then linearly
                 to end at step D ("warmup-stable-decay")
After D every schedule stays at end.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from onn_jax.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> float | optax.Schedule:
    """optim.lr as a float (schedule `constant`) or an optax schedule over the update count."""
    if cfg.schedule == "constant":
        return cfg.lr
    peak, warm = float(cfg.lr), cfg.warmup_steps
    decay = max(cfg.decay_steps or total_steps, warm)
    end = peak * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, warm) if warm else optax.constant_schedule(peak)
    if cfg.schedule == "warmup_cosine":
        tail = optax.cosine_decay_schedule(peak, max(decay - warm, 1), alpha=cfg.min_lr_ratio)
        return optax.join_schedules([warmup, tail], [warm])
    if cfg.schedule == "linear":
        tail = optax.linear_schedule(peak, end, max(decay - warm, 1))
        return optax.join_schedules([warmup, tail], [warm])
    if cfg.schedule == "wsd":
        cool = min(max(1, math.ceil(cfg.cooldown_fraction * decay)), decay - warm) if decay > warm else 0
        stable_end = decay - cool
        tail = optax.linear_schedule(peak, end, max(cool, 1))
        return optax.join_schedules([warmup, optax.constant_schedule(peak), tail], [warm, stable_end])
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def schedule_count(opt_state: Any) -> jax.Array | None:
    """The update count a schedule inside `opt_state` reads (optax's ScaleByScheduleState, or
    onn_jax.core.optimizer's PerExpertAdamState global count), or None."""
    from onn_jax.core.optimizer import PerExpertAdamState
    kinds = (optax.ScaleByScheduleState, PerExpertAdamState)
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(s, kinds):
            return s.count
    return None


def last_lr(lr: float | optax.Schedule, opt_state: Any, step: int) -> float:
    """The learning rate of the last applied update: lr(count - 1) with the optimizer's own
    count (which a skipped non-finite step does not advance), or lr(step - 1) where the state
    holds no count. `step` counts the steps taken (train state's step)."""
    if not callable(lr):
        return float(lr)
    count = schedule_count(opt_state)
    n = int(jax.device_get(count)) if count is not None else int(step)
    return float(lr(jnp.asarray(max(n - 1, 0), jnp.int32)))
