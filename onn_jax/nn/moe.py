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

Under the dropless dispatch the Y tap is left out (`MoETaps.expert_out = None`) when the
surprise function needs only dL/dout (`output_grad`, `output_grad_closed`; `y_tap_needed`):
for a kept pair dL/dY[t, e] = w[t, e] dL/dout[t], so the faithful S = w |dL/dout| on the kept
pairs and 0 on the dropped ones, with no [R, C] float32 tap, cotangent or row cast (the rows
stay in the compute dtype; the combine adds them in float32 either way).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onn_jax.config import MoEConfig
from onn_jax.core.experts import combine, expert_outputs
from onn_jax.core.gate import RouterOutput, top_any_gate, topk_gate
from onn_jax.core.surprise import SurpriseFn, SurpriseInputs, output_grad_closed_surprise, output_grad_surprise
from onn_jax.core.surprise_registry import get_surprise_fn
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
    make_dropless,
    pair_rows,
    rows_to_pairs,
    token_expert_outputs,
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

    expert_out: jax.Array | None  # [N, E, C] float32 ([E, K, C] sparse, [R, C] dropless; None: no Y tap)
    moe_out: jax.Array            # [N, C] float32


# Surprise definitions that read only dL/dout and the combine weights: under the dropless
# dispatch they need no tap on the expert-output rows.
OUT_ONLY_SURPRISES = (output_grad_surprise, output_grad_closed_surprise)


def y_tap_needed(cfg: MoEConfig, surprise_fn: SurpriseFn | None) -> bool:
    """Whether the layer's taps must include the expert-output tap: always for the dense and
    sparse dispatch, under dropless only for a surprise function that reads dL/dY (None: the
    config's own surprise function)."""
    if cfg.dispatch != "dropless":
        return True
    if surprise_fn is None:
        surprise_fn = get_surprise_fn(cfg.surprise)
    return surprise_fn not in OUT_ONLY_SURPRISES


def zero_taps(num_tokens: int, num_experts: int, hidden: int) -> MoETaps:
    return MoETaps(jnp.zeros((num_tokens, num_experts, hidden), jnp.float32),
                   jnp.zeros((num_tokens, hidden), jnp.float32))


def layer_taps(cfg: MoEConfig, num_tokens: int, hidden: int, y_tap: bool = True) -> MoETaps:
    """Zero taps shaped for the layer's dispatch: Y taps are [E, K, C] slots when sparse, [R, C]
    rows when dropless, and left out (None) under dropless when `y_tap` is False."""
    if cfg.dispatch == "dropless":
        if not y_tap:
            return MoETaps(None, jnp.zeros((num_tokens, hidden), jnp.float32))
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
        d_y = None if d_y is None else _to_pairs(d_y, record.dispatch)
        y = _to_pairs(y, record.dispatch)
    return SurpriseInputs(d_expert_out=d_y, d_moe_out=d_taps.moe_out, expert_out=y,
                          weights=record.router.weights, mask=record.router.mask,
                          expert_in=record.expert_in, expert_params=record.expert_params)


def layer_surprise(surprise_fn: SurpriseFn, record: MoERecord, d_taps: MoETaps) -> jax.Array:
    """One layer's Surprise S [N, E] from the main loss's tap cotangents.

    Under sparse dispatch the faithful `output_grad` is taken in slot space (a norm over the
    E*K slot rows, then an [E, K] -> [N, E] gather) instead of on the [N, E, C] pair grid;
    the values are the same. Every other definition sees `surprise_inputs`.
    """
    if d_taps.expert_out is None:  # dropless with no Y tap (y_tap_needed): from dL/dout alone
        if surprise_fn not in OUT_ONLY_SURPRISES:
            raise ValueError("this surprise function reads dL/dY: build the taps with y_tap=True")
        g_N = jnp.sqrt(jnp.sum(jnp.square(d_taps.moe_out.astype(jnp.float32)), axis=-1))
        w_NxE = record.router.weights.astype(jnp.float32)
        if surprise_fn is output_grad_surprise:  # dL/dY = w dL/dout on kept pairs, none elsewhere
            w_NxE = jnp.where(record.dispatch.kept_NxE, w_NxE, 0.0)
        return w_NxE * g_N[:, None]
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
    with jax.named_scope("route"):  # named scopes: profiles attribute time by them (bench/attribution.py)
        # Under jax.checkpoint saving only matmul outputs: the backward keeps x in its own dtype
        # and recomputes the router's float32 copy / normalisation of it ([N, C] float32 per layer).
        router = jax.checkpoint(lambda p, x: route(p, x, cfg), prevent_cse=False,
                                policy=jax.checkpoint_policies.dots_saveable)(params, x_NxC)
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
    y_tap = None if taps is None else taps.expert_out
    if found is not None:
        out_NxC, y_RxC, d = ep_dropless_layer(params, x_NxC, cfg, y_tap, router, *found)
    else:
        token_sum = resolve_token_sum(cfg.token_sum, x_NxC.shape[-1])
        with jax.named_scope("layout"):
            d = make_dropless(router.mask, pair_rows(x_NxC.shape[0], cfg))
        with jax.named_scope("experts"):  # the dispatch gather too (a custom VJP with the first GEMM)
            y_RxC = token_expert_outputs(params["experts"], x_NxC, d, cfg.expert_kind,
                                         resolve_gemm(cfg.gemm, x_NxC.dtype), token_sum)
        if y_tap is not None:  # the Surprise reads dL/dY: float32 rows plus the tap
            y_RxC = y_RxC.astype(jnp.float32) + y_tap
        with jax.named_scope("combine"):
            out_NxC = combine_rows(router.weights, y_RxC, d, token_sum)  # adds in float32 either way
    if taps is not None:
        out_NxC = out_NxC + taps.moe_out
    return out_NxC, MoERecord(router=router, expert_out=y_RxC, dispatch=d, expert_in=x_NxC,
                              expert_params=params["experts"])
