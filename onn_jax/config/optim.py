"""optim.*: the expert gradient filter, AdamW, the learning-rate schedule and accumulation."""
from __future__ import annotations

from dataclasses import dataclass, field

from onn_jax.config.errors import check, choice, nonneg_float, positive_int

FILTER_MODES = ("one_sided", "two_sided", "off")


FILTER_SCOPES = ("pooled", "per_layer")


SCHEDULES = ("constant", "warmup_cosine", "wsd", "linear")


IDLE_EXPERTS = ("skip", "zero_grad")


@dataclass(frozen=True)
class FilterConfig:
    """The expert gradient filter ("2-sigma").

    mode: `one_sided` (faithful: zero g > mean + sigma*std), `two_sided` (zero |g| >
      mean(|g|) + sigma*std(|g|)) or `off`.
    scope: `pooled` (faithful: statistics over all expert gradients together) or
      `per_layer` (statistics per transformer block).
    """

    mode: str = "one_sided"
    scope: str = "pooled"
    sigma: float = 2.0

    def __post_init__(self):
        p = "optim.grad_filter."
        choice(self.mode, FILTER_MODES, p + "mode")
        choice(self.scope, FILTER_SCOPES, p + "scope")
        nonneg_float(self.sigma, p + "sigma")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the faithful PoC hyper-parameters, plus the expert gradient filter.

    clip_norm: optional global-norm clipping (an option; None = off, faithful).
    schedule: learning-rate schedule (onn_jax.training.schedules): `constant` (faithful), `warmup_cosine`,
      `wsd` (warmup, stable, then a linear cooldown over the last cooldown_fraction of
      decay_steps) or `linear` (warmup, then linear decay).
    warmup_steps: steps of linear warmup from 0 to lr (schedules other than constant).
    decay_steps: the step at which the schedule reaches lr * min_lr_ratio; None = train.steps.
    min_lr_ratio: the final learning rate as a share of lr.
    cooldown_fraction: `wsd` only: share of decay_steps spent in the final linear decay.
    accum_steps: split each batch into this many microbatches whose summed gradient equals the
      one-batch gradient (onn_jax.training.accumulate); 1 = off (faithful).
    idle_experts: what an expert that received no token in the step gets (onn_jax.core.optimizer):
      `skip` (faithful: no gradient; left out of the 2-sigma statistics, AdamW skips it and
      its own step counter stays) or `zero_grad` (a zero gradient: pooled, decayed, moved by
      momentum; one step counter for all parameters).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None
    grad_filter: FilterConfig = field(default_factory=FilterConfig)
    idle_experts: str = "skip"
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_lr_ratio: float = 0.0
    cooldown_fraction: float = 0.2
    accum_steps: int = 1

    def __post_init__(self):
        p = "optim."
        choice(self.idle_experts, IDLE_EXPERTS, p + "idle_experts")
        _check_recipe_optim(self)
        check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool), p + "lr",
               f"must be a number, got {type(self.lr).__name__} {self.lr!r}")
        check(self.lr > 0, p + "lr", f"must be > 0, got {self.lr}")
        for name in ("weight_decay", "eps"):
            nonneg_float(getattr(self, name), p + name)
        for name in ("b1", "b2"):
            v = getattr(self, name)
            nonneg_float(v, p + name)
            check(v < 1, p + name, f"must be < 1, got {v}")
        if self.clip_norm is not None:
            nonneg_float(self.clip_norm, p + "clip_norm")
            check(self.clip_norm > 0, p + "clip_norm", f"must be > 0, got {self.clip_norm}")
        check(isinstance(self.grad_filter, FilterConfig), p + "grad_filter",
               "must be a FilterConfig")


def _check_recipe_optim(c: "OptimConfig") -> None:
    """Validates OptimConfig's schedule and accumulation fields."""
    p = "optim."
    choice(c.schedule, SCHEDULES, p + "schedule")
    check(isinstance(c.warmup_steps, int) and not isinstance(c.warmup_steps, bool) and c.warmup_steps >= 0,
           p + "warmup_steps", f"must be an integer >= 0, got {c.warmup_steps!r}")
    if c.decay_steps is not None:
        positive_int(c.decay_steps, p + "decay_steps")
        check(c.decay_steps >= c.warmup_steps, p + "decay_steps",
               f"must be >= optim.warmup_steps ({c.warmup_steps}), got {c.decay_steps}")
    nonneg_float(c.min_lr_ratio, p + "min_lr_ratio")
    check(c.min_lr_ratio <= 1, p + "min_lr_ratio", f"must be <= 1, got {c.min_lr_ratio}")
    nonneg_float(c.cooldown_fraction, p + "cooldown_fraction")
    check(0 < c.cooldown_fraction <= 1, p + "cooldown_fraction",
           f"must be in (0, 1], got {c.cooldown_fraction}")
    positive_int(c.accum_steps, p + "accum_steps")
