"""The MoE feed-forward layer as a pure function of a parameter dict and tokens.

    out, record = moe_layer(params, x_NxC, moe_cfg, taps)

`taps` (optional) are zero arrays added to the dense expert output Y [N, E, C] and to the
layer output out [N, C]; differentiating the main loss with respect to them yields
dL/dY and dL/dout in one reverse pass (the Surprise mechanism) without touching the
forward values. `record` keeps what the gate loss and the metrics need.

With `cfg.dispatch == "sparse"` (onn_jax.dispatch.capacity) only active pairs within a per-expert
capacity are computed; Y and its tap then live in slot space [E, K, C]. `layer_surprise`
takes the faithful Surprise there; `surprise_inputs` maps them back to the pair layout
[N, E, C] for any other surprise function. `cfg.dispatch == "dropless"` (onn_jax.dispatch.dropless)
does the same with one expert-sorted row buffer [R, C] and no per-expert capacity.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import MoEConfig
from onn_jax.core.experts import combine, expert_outputs
from onn_jax.core.gate import RouterOutput, top_any_gate, topk_gate
from onn_jax.core.surprise import SurpriseFn, SurpriseInputs, output_grad_surprise
from onn_jax.dispatch.capacity import (
    Dispatch,
    combine_slots,
    dispatch_tokens,
    expert_capacity,
    make_dispatch,
    slot_expert_outputs,
    to_pairs,
)
from onn_jax.dispatch.dropless import (
    Dropless,
    combine_rows,
    dispatch_rows,
    make_dropless,
    pair_rows,
    row_expert_outputs,
    rows_to_pairs,
)
from onn_jax.dispatch.expert_parallel import EPRows, ep_dropless_layer, ep_rows_to_pairs, ep_tap_rows
from onn_jax.dispatch.grouped_gemm import resolve_gemm
from onn_jax.dispatch.token_sums import resolve_token_sum
from onn_jax.parallel.constrain import expert_mesh


class MoERecord(NamedTuple):
    """Forward values of one MoE layer kept for the gate loss, Surprise and metrics."""

    router: RouterOutput
    expert_out: jax.Array  # Y [N, E, C] float32; slot space [E, K, C] under sparse dispatch
    dispatch: Dispatch | Dropless | EPRows | None = None  # set under sparse / dropless dispatch
    expert_in: jax.Array | None = None  # x [N, C], the experts' input (surprise `learning_cost`)
    expert_params: dict | None = None   # the stacked expert weights (surprise `learning_cost`)


class MoETaps(NamedTuple):
    """Zero taps whose cotangents are dL/dY and dL/dout."""

    expert_out: jax.Array  # [N, E, C] float32 ([E, K, C] under sparse dispatch)
    moe_out: jax.Array     # [N, C] float32


def zero_taps(num_tokens: int, num_experts: int, hidden: int) -> MoETaps:
    return MoETaps(jnp.zeros((num_tokens, num_experts, hidden), jnp.float32),
                   jnp.zeros((num_tokens, hidden), jnp.float32))


def layer_taps(cfg: MoEConfig, num_tokens: int, hidden: int) -> MoETaps:
    """Zero taps shaped for the layer's dispatch: Y taps are [E, K, C] slots when sparse."""
    if cfg.dispatch == "dropless":
        found = expert_mesh()  # expert-parallel: the returned rows of every device
        rows = pair_rows(num_tokens, cfg) if found is None else ep_tap_rows(num_tokens, cfg, found[0])
        return MoETaps(jnp.zeros((rows, hidden), jnp.float32),
                       jnp.zeros((num_tokens, hidden), jnp.float32))
    if cfg.dispatch == "sparse":
        k = expert_capacity(num_tokens, cfg)
        return MoETaps(jnp.zeros((cfg.num_experts, k, hidden), jnp.float32),
                       jnp.zeros((num_tokens, hidden), jnp.float32))
    return zero_taps(num_tokens, cfg.num_experts, hidden)


def surprise_inputs(record: MoERecord, d_taps: MoETaps) -> SurpriseInputs:
    """The surprise function's inputs in the pair layout [N, E, C], whatever the dispatch.

    Under sparse dispatch, pairs that were not computed (inactive or dropped) get zero
    Y and zero dL/dY, so the faithful S is 0 there, as in the dense path for inactive pairs.
    """
    d_y, y = d_taps.expert_out, record.expert_out
    if record.dispatch is not None:
        d_y, y = _to_pairs(d_y, record.dispatch), _to_pairs(y, record.dispatch)
    return SurpriseInputs(d_expert_out=d_y, d_moe_out=d_taps.moe_out, expert_out=y,
                          weights=record.router.weights, mask=record.router.mask,
                          expert_in=record.expert_in, expert_params=record.expert_params)


def layer_surprise(surprise_fn: SurpriseFn, record: MoERecord, d_taps: MoETaps) -> jax.Array:
    """One layer's Surprise S [N, E] from the main loss's tap cotangents.

    Under sparse dispatch the faithful `output_grad` is taken in slot space (a norm over the
    E*K slot rows, then an [E, K] -> [N, E] gather) instead of on the [N, E, C] pair grid;
    the values are the same. Every other definition sees `surprise_inputs`.
    """
    if record.dispatch is not None and surprise_fn is output_grad_surprise:
        d_y = d_taps.expert_out.astype(jnp.float32)
        return _to_pairs(jnp.sqrt(jnp.sum(jnp.square(d_y), axis=-1)), record.dispatch)
    return surprise_fn(surprise_inputs(record, d_taps))


def _to_pairs(a, d: Dispatch | Dropless | EPRows) -> jax.Array:
    """A slot- or row-space array in the pair layout [N, E, ...] (0 where not computed)."""
    if isinstance(d, EPRows):
        return ep_rows_to_pairs(a, d)
    return rows_to_pairs(a, d) if isinstance(d, Dropless) else to_pairs(a, d)


def expert_received_tokens(record: MoERecord) -> jax.Array:
    """[E] bool: expert e was run on at least one token of the batch in this layer.

    This is what "received a token" means for the no-token rule (onn_jax.core.optimizer): from
    the router mask (some token has the pair active) under `dense` dispatch, and from the
    pairs actually computed (`dispatch.kept_NxE`: active and within the capacity) under a
    dispatch that may drop pairs. An expert whose pairs were all dropped got no gradient.
    Under jit on a sharded batch the reduction is over the global batch.
    """
    mask_NxE = record.router.mask if record.dispatch is None else record.dispatch.kept_NxE
    return jnp.any(mask_NxE, axis=0)


def route(params: dict, x_NxC: jax.Array, cfg: MoEConfig) -> RouterOutput:
    """Runs the configured router (`surprise`: top-any gate, `topk`: linear top-k)."""
    if cfg.router == "surprise":
        return top_any_gate(x_NxC, params["prototypes"], params["thresholds"],
                            cfg.effective_fallback_k, params.get("live"))
    if cfg.router == "topk":
        return topk_gate(x_NxC, params["router"], cfg.top_k, params.get("router_bias"))
    raise ValueError(f"moe_layer has no router {cfg.router!r}")


def moe_layer(params: dict, x_NxC: jax.Array, cfg: MoEConfig,
              taps: MoETaps | None = None) -> tuple[jax.Array, MoERecord]:
    """Routes, runs the experts, and combines: out[t] = sum_e w[t,e] Y[t,e].

    `dense` dispatch runs every expert on every token (the faithful reference); `sparse`
    runs only active pairs within the capacity (onn_jax.dispatch.capacity). The output is float32;
    the caller casts it back to the residual dtype.
    """
    router = route(params, x_NxC, cfg)
    if cfg.dispatch == "dropless":
        return _dropless_layer(params, x_NxC, cfg, taps, router)
    if cfg.dispatch == "sparse":
        d = make_dispatch(router.mask, expert_capacity(x_NxC.shape[0], cfg))
        y_ExKxC = slot_expert_outputs(params["experts"], dispatch_tokens(x_NxC, d),
                                      cfg.expert_kind).astype(jnp.float32)
        if taps is not None:
            y_ExKxC = y_ExKxC + taps.expert_out
        out_NxC = combine_slots(router.weights, y_ExKxC, d)
        if taps is not None:
            out_NxC = out_NxC + taps.moe_out
        return out_NxC, MoERecord(router=router, expert_out=y_ExKxC, dispatch=d, expert_in=x_NxC,
                                  expert_params=params["experts"])
    y_NxExC = expert_outputs(params["experts"], x_NxC, cfg.expert_kind).astype(jnp.float32)
    if taps is not None:
        y_NxExC = y_NxExC + taps.expert_out
    out_NxC = combine(router.weights, y_NxExC)
    if taps is not None:
        out_NxC = out_NxC + taps.moe_out
    return out_NxC, MoERecord(router=router, expert_out=y_NxExC, expert_in=x_NxC,
                              expert_params=params["experts"])


def _dropless_layer(params, x_NxC, cfg: MoEConfig, taps: MoETaps | None, router: RouterOutput):
    """The experts on the kept pairs' rows (onn_jax.dispatch.dropless), combined back in token order;
    expert-parallel inside a sharded step with mesh.expert > 1 (onn_jax.dispatch.expert_parallel)."""
    found = expert_mesh()
    if found is not None:
        out_NxC, y_RxC, d = ep_dropless_layer(params, x_NxC, cfg, None if taps is None else taps.expert_out,
                                              router, *found)
    else:
        d = make_dropless(router.mask, pair_rows(x_NxC.shape[0], cfg))
        token_sum = resolve_token_sum(cfg.token_sum, x_NxC.shape[-1])
        y_RxC = row_expert_outputs(params["experts"], dispatch_rows(x_NxC, d, token_sum), d.sizes_E,
                                   cfg.expert_kind, resolve_gemm(cfg.gemm, x_NxC.dtype))
        y_RxC = y_RxC.astype(jnp.float32)
        if taps is not None:
            y_RxC = y_RxC + taps.expert_out
        out_NxC = combine_rows(router.weights, y_RxC, d, token_sum)
    if taps is not None:
        out_NxC = out_NxC + taps.moe_out
    return out_NxC, MoERecord(router=router, expert_out=y_RxC, dispatch=d, expert_in=x_NxC,
                              expert_params=params["experts"])
