"""The seam through which research options of the MoE gate plug into the train step.

The faithful step (onn_jax.training.step) trains each MoE layer's gate toward its Surprise S:
CE to argmin S plus KL to softmax(-S), over every token. An option changes that through the
hooks of `GateOption` below, and only through them; the step calls them for the options that
model.moe turns on (onn_jax.training.options.registry), in the registry's order:

    layer_state(cfg)        per-layer router state at step 0 (TrainState.router_state, not a
                            parameter: the optimizer never touches it)
    forward_keys            the entries of that state the forward reads (merged into
                            block_i/moe of the parameters for model.apply)
    shape_gate(ctx, gate)   what the layer's gate loss sees: S, the token set, the hard target
    extra_losses(m, pre)    {part name: (weight, value)} added to the layer's gate loss
    update(...)             the layer's router state (and MoE parameters) after the update
    summarize(metrics)      the step metrics of its per-layer update metrics

A new option is one module with one GateOption subclass plus a line in the registry; neither
the step nor the model changes (a forward key the model must read is the exception:
onn_jax.nn.layers.MoEFeedForward reads `router_bias` and `live`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

from onn_jax.config import ModelConfig, MoEConfig

DEAD_SURPRISE = 1e9  # S of a masked-out expert in the gate loss: never argmin, 0 in softmax(-S)


class LayerGate(NamedTuple):
    """What one MoE layer's gate loss is trained toward. The faithful view is LayerGate(S)."""

    surprise: jax.Array              # [N, E] S as the gate loss sees it (soft target softmax(-S))
    tokens: jax.Array | None = None  # [N] bool/0-1: the tokens the gate loss averages over (None: all)
    target: jax.Array | None = None  # [N] int32 hard target (None: argmin S)


class GateContext(NamedTuple):
    """What shape_gate may read about the layer and the step."""

    cfg: ModelConfig
    layer: int
    loss_mask_N: jax.Array  # [N] the main loss's label mask
    step: jax.Array         # the step count before this update (seeds random choices)
    state: dict             # this layer's router state ({} when no option keeps one)


class GateOption:
    """One option of the MoE gate beyond the faithful algorithm; every hook defaults to 'no
    change', so an option overrides only what it changes (see the module docstring)."""

    name: str = ""
    stateful: bool = False               # keeps per-layer router state (layer_state, update)
    forward_keys: tuple[str, ...] = ()

    def enabled(self, m: MoEConfig) -> bool:
        raise NotImplementedError

    def layer_state(self, cfg: ModelConfig) -> dict:
        return {}

    def shape_gate(self, ctx: GateContext, gate: LayerGate) -> LayerGate:
        return gate

    def extra_losses(self, m: MoEConfig, pre_NxE: jax.Array) -> dict[str, tuple[float, jax.Array]]:
        return {}

    def update(self, m: MoEConfig, state: dict, moe_params: dict, record: Any, step: jax.Array
               ) -> tuple[dict, dict, dict[str, jax.Array]]:
        """(this layer's state, its MoE parameters, per-layer metrics) after the optimizer update;
        `record` is the layer's MoERecord of the forward before the update, `step` the count after."""
        return state, moe_params, {}

    def summarize(self, per_layer: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
        """The step metrics of the per-layer metrics of `update`."""
        return {}
