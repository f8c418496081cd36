"""The optax chain of a run, built from optim.*: expert gradient filter -> optional
global-norm clip -> AdamW (per-expert under idle_experts='skip'; onn_jax.core.optimizer).
"""
from __future__ import annotations

import optax

from onn_jax.config import OptimConfig
from onn_jax.core.grad_filter import sigma_filter
from onn_jax.core.optimizer import ScalarOrSchedule, per_expert_adamw


def make_optimizer(cfg: OptimConfig, learning_rate: ScalarOrSchedule | None = None
                   ) -> optax.GradientTransformationExtraArgs:
    """Expert gradient filter -> optional global-norm clip -> AdamW (faithful hyper-parameters).

    learning_rate: a float or an optax schedule of the global step; default `cfg.lr`.
    Under `idle_experts='skip'` pass `expert_active=` to the update (see the module docstring).
    """
    f = cfg.grad_filter
    lr = cfg.lr if learning_rate is None else learning_rate
    skip = cfg.idle_experts == "skip"
    parts = [sigma_filter(f.mode, f.scope, f.sigma, idle_aware=skip)]
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if skip:
        parts.append(per_expert_adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    else:
        parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
