"""The train state: step, params, optimizer state and the non-parameter router state."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from onn_jax.config import ModelConfig
from onn_jax.nn.transformer import init_params
from onn_jax.training.options.router_state import forward_params, init_router_state

Batch = dict[str, jax.Array]  # inputs [B, T] int32, targets [B, T] int32, loss_mask [B, T]


@flax.struct.dataclass
class TrainState:
    """step, params, optimizer state, and the non-parameter router state (onn_jax.training.options.router_state;
    {} unless a stateful routing option is on)."""

    step: jax.Array
    params: Any
    opt_state: Any
    router_state: Any = flax.struct.field(default_factory=dict)

    @property
    def model_params(self) -> Any:
        """What model.apply needs: params plus the router state the forward reads."""
        return forward_params(self.params, self.router_state)


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(model_cfg, rng)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      router_state=init_router_state(model_cfg))
