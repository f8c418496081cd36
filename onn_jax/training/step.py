"""The unified train step: one forward, Surprise from the main loss, one joint update.

    grads = d main/d params + w_aux * d (sum_l gate_loss_l(pre_l, S_l)) / d params

with S_l = surprise(dL_main/dY_l, ...) held constant. `jax.vjp` linearises the forward once;
its pullback is applied twice to the same residuals:
  1. cotangent (1, 0) -> only the taps' cotangents are used, so XLA prunes every parameter
     gradient and everything below the lowest MoE layer (the cheap Surprise backward);
  2. cotangent (1, w_aux * d gate / d pre) -> the gradient of the total loss.
The forward is never recomputed. The optax chain applies the expert filter, then AdamW
(onn_jax.training.optimizer), told which experts received no token in the step (`expert_active`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from onn_jax.config import ModelConfig
from onn_jax.core.grad_filter import SigmaFilterState
from onn_jax.core.head_loss import chunked_head_loss
from onn_jax.core.losses import next_token_loss
from onn_jax.core.surprise import SurpriseFn
from onn_jax.core.surprise_registry import get_surprise_fn
from onn_jax.core.surprise_variants import advantage_surprise
from onn_jax.nn.attention import compute_dtype
from onn_jax.nn.moe import expert_received_tokens, layer_surprise, layer_taps, y_tap_needed
from onn_jax.nn.output import output_loss
from onn_jax.nn.transformer import Transformer, model_taps
from onn_jax.nn.units import UnitRecords, unit_records, unit_taps
from onn_jax.parallel.constrain import batch_shards
from onn_jax.training.accumulate import accumulated_grads
from onn_jax.training.gate_losses import layer_gate_loss, unit_gate_inputs, unit_gate_loss, unit_surprises
from onn_jax.training.metrics import moe_metrics, unit_metrics
from onn_jax.training.options.registry import layer_gates
from onn_jax.training.options.router_state import forward_params, update_router_state
from onn_jax.training.state import Batch, TrainState


def step_taps(cfg: ModelConfig, batch_size: int, seq_len: int, surprise_fn: str | SurpriseFn | None = None):
    """The zero Surprise taps of every MoE layer, shaped for its dispatch and for what
    `surprise_fn` (default: the config's) reads; None where no Surprise is taken (the dense FFN
    and the top-k router: their forward carries no tap at all)."""
    if cfg.moe.router != "surprise":
        return None
    if cfg.moe.dispatch == "dense":
        return model_taps(cfg, batch_size, seq_len)
    fn = None if surprise_fn is None else get_surprise_fn(surprise_fn)
    y_tap = y_tap_needed(cfg.moe, fn)
    return tuple(layer_taps(cfg.moe, batch_size * seq_len, cfg.hidden, y_tap) for _ in range(cfg.num_layers))


def forward_loss(cfg: ModelConfig, model: Transformer, params, batch: Batch, taps, utaps,
                 per_token: bool = False):
    """The model's forward and main loss, as the train step and the eval/analysis pass take it:
    (main, acc, count, ce_BxT (per_token only, else None), MoE records, unit records). utaps
    None: no gated units beyond the MoE. An adaptive softmax head applies its own loss, and so
    does the dense head under model.output.loss_chunk (fused with its CE, onn_jax.core.head_loss)."""
    head = {"return_hidden": True} if cfg.output.kind == "adaptive" or cfg.output.loss_chunk else {}
    if utaps is None:
        (logits, records), urecords = model.apply({"params": params}, batch["inputs"], taps,
                                                  **head), UnitRecords()
    else:
        (logits, records), state = model.apply({"params": params}, batch["inputs"], taps,
                                               unit_taps=utaps, mutable=["gated"], **head)
        urecords = unit_records(cfg, state["gated"])
    ce_BxT = None
    if cfg.output.kind == "adaptive":  # `logits` are the hidden states (onn_jax.nn.output)
        main, acc, count, ce_BxT = output_loss(cfg, params, logits, batch["targets"], batch["loss_mask"])
    elif head:  # model.output.loss_chunk: the head and its loss fused over chunks of positions
        main, acc, count, ce_BxT = chunked_head_loss(logits, params["lm_head"]["kernel"], batch["targets"],
                                                     batch["loss_mask"], cfg.output.loss_chunk, compute_dtype(cfg),
                                                     batch_shards())
    else:
        main, acc, count = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        if per_token:
            ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return main, acc, count, (ce_BxT if per_token else None), records, urecords


def compute_grads(params, batch: Batch, cfg: ModelConfig,
                  surprise_fn: str | SurpriseFn | None = None, router_state: Any = None,
                  step: jax.Array | int = 0, return_records: bool = False,
                  main_share: jax.Array | None = None, gate_share: jax.Array | None = None):
    """Gradient of main + w_aux * sum of gate losses, and the step's metrics (no update).

    router_state: TrainState.router_state (what the forward reads of it); step: the step count
    (seeds gate_tie_break='random'). Returns (grads, metrics), plus the MoE records with
    return_records (for onn_jax.training.options.router_state.update_router_state).

    main_share, gate_share (gradient accumulation, onn_jax.training.accumulate): this batch is a
    microbatch; its main loss (hence its Surprise) and its gate losses enter the gradient times
    these shares of the whole batch's label / token count. The metrics stay unscaled.

    metrics["moe/expert_active"] ([num_layers, E] bool, absent without MoE layers) says which
    experts received a token (`expert_received_tokens`); train_step pops it and hands it to
    the optimizer as `expert_active` (accumulation ORs it over microbatches).
    """
    model = Transformer(cfg)
    b, t = batch["inputs"].shape
    taps = step_taps(cfg, b, t, surprise_fn)
    uses_surprise = cfg.moe.router == "surprise"
    surprise_fn = get_surprise_fn(surprise_fn or cfg.moe.surprise) if uses_surprise else None
    if surprise_fn is advantage_surprise and cfg.moe.dispatch != "dense":
        raise ValueError("surprise `advantage` needs every expert's output; it cannot run with "
                         f"model.moe.dispatch={cfg.moe.dispatch!r}")

    utaps = unit_taps(cfg, b, t)  # gated units beyond the MoE (heads); None when there are none
    loss_mask_N = batch["loss_mask"].reshape(-1)

    def forward(params, taps, utaps):
        main, acc, count, _, records, urecords = forward_loss(cfg, model, forward_params(params, router_state),
                                                              batch, taps, utaps)
        gate_inputs = (tuple(r.router.pre for r in records if r is not None), unit_gate_inputs(urecords))
        scaled = main if main_share is None else main * main_share
        return (scaled, gate_inputs), (main, acc, count, records, urecords)

    (_, gate_inputs), pullback, (main, acc, count, records, urecords) = jax.vjp(forward, params, taps, utaps,
                                                                                has_aux=True)
    records = tuple(r for r in records if r is not None)
    one = jnp.ones_like(main)
    no_gate = jax.tree.map(jnp.zeros_like, gate_inputs)

    # Every gate's S from the one pullback of the main loss alone.
    surprises = (None,) * len(records)
    usurprises = UnitRecords()
    if uses_surprise or utaps is not None:
        with jax.named_scope("surprise"):
            _, d_taps, d_utaps = pullback((one, no_gate))
            if uses_surprise:
                surprises = tuple(jax.lax.stop_gradient(layer_surprise(surprise_fn, r, d))
                                  for d, r in zip(d_taps, records))
            usurprises = unit_surprises(cfg, urecords, d_utaps)

    # What each gate loss is trained toward: S, every token, argmin S, unless a gate option
    # (onn_jax.training.options) reshapes it.
    gates = (None,) * len(records)
    if uses_surprise:
        gates = layer_gates(cfg, surprises, router_state, loss_mask_N, step)
        surprises = tuple(g.surprise for g in gates)
    w_aux = cfg.moe.w_aux

    def total_gate_loss(gate_inputs):
        moe_inputs, unit_inputs = gate_inputs
        losses, parts = zip(*(layer_gate_loss(cfg, pre, gate, r)
                              for pre, r, gate in zip(moe_inputs, records, gates))
                            ) if records else ((), ())
        moe_loss = sum(losses, jnp.zeros([], jnp.float32))
        unit_total, per_kind = unit_gate_loss(cfg, unit_inputs, urecords, usurprises, loss_mask_N)
        return moe_loss * w_aux + unit_total, (moe_loss, parts, unit_total, per_kind)

    # Every gate loss in the second pullback, each kind weighted by its own w_aux.
    with jax.named_scope("gate_loss"):
        (_, (gate_loss, parts, unit_total, per_kind)), d_gate = jax.value_and_grad(
            total_gate_loss, has_aux=True)(gate_inputs)
    if gate_share is not None:
        d_gate = jax.tree.map(lambda g: g * gate_share, d_gate)
    with jax.named_scope("gradient"):
        grads, _, _ = pullback((one, d_gate))

    metrics = {
        "train/main_loss": main,
        "train/main_acc": acc,
        "train/loss_tokens": count,
        "train/total_loss": main + w_aux * gate_loss + unit_total,
        "moe/gate_loss": gate_loss,
    }
    metrics.update(moe_metrics(cfg, params, records, surprises, parts, loss_mask_N))
    metrics.update(unit_metrics(cfg, params, urecords, usurprises, per_kind, loss_mask_N))
    if records:
        metrics["moe/expert_active"] = jnp.stack([expert_received_tokens(r) for r in records])
    return (grads, metrics, records) if return_records else (grads, metrics)


def train_step(state: TrainState, batch: Batch, cfg: ModelConfig, tx: optax.GradientTransformation,
               surprise_fn: str | SurpriseFn | None = None,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One joint update. Pure: jit it (see make_train_step). accum_steps > 1 computes the
    gradient from that many microbatches (onn_jax.training.accumulate; the same step). Config refuses
    accumulation together with the router-state options (their updates need one batch's records)."""
    if accum_steps > 1:
        grads, metrics = accumulated_grads(compute_grads, state.params, batch, cfg, accum_steps, surprise_fn)
        records = None
    else:
        grads, metrics, records = compute_grads(state.params, batch, cfg, surprise_fn, state.router_state,
                                                state.step, return_records=True)
    active_LxE = metrics.pop("moe/expert_active", None)
    extra = {}
    if active_LxE is not None:
        metrics["moe/idle_experts"] = jnp.sum(~active_LxE).astype(jnp.float32)
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            extra["expert_active"] = active_LxE
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    router_state, params, rs_metrics = update_router_state(cfg, state.router_state, params, records,
                                                           state.step + 1)
    metrics.update(rs_metrics)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    filt = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SigmaFilterState))
            if isinstance(s, SigmaFilterState)]
    if filt:
        metrics["train/filtered_frac"] = filt[0].zeroed_fraction
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, router_state=router_state), metrics


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation,
                    surprise_fn: str | SurpriseFn | None = None, donate: bool = True,
                    accum_steps: int = 1) -> Callable:
    """The jitted step `(state, batch) -> (state, metrics)`, donating the old state."""
    fn = functools.partial(train_step, cfg=cfg, tx=tx, surprise_fn=surprise_fn, accum_steps=accum_steps)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
