"""Held-out evaluation: main loss and accuracy, routing metrics and a Surprise histogram.

The eval step runs the forward and one reverse pass of the main loss into the Surprise
taps (as the train step does, without any parameter gradient), so the histogram shows the
very S the gate is trained on. The histogram counts active (token, expert) pairs with S > 0
(the faithful S is exactly 0 on inactive pairs); `eval/surprise_zero_frac` is the share of
active pairs with S == 0 (e.g. positions whose loss is masked, in the last layer).
Gated attention heads and the slot embedding get the train step's `attn/*` and `embed/*`
metrics as `eval/attn_*` and `eval/embed_*` (unit_eval_sums; docs/FULL_STACK.md, Metrics).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import ModelConfig
from onn_jax.core.analysis import gate_accuracy
from onn_jax.core.routing_metrics import dead_experts, routing_metrics
from onn_jax.core.surprise_registry import get_surprise_fn
from onn_jax.nn.layer_stack import layer_params
from onn_jax.nn.moe import layer_surprise
from onn_jax.nn.transformer import Transformer
from onn_jax.nn.units import UnitRecords, unit_taps
from onn_jax.training.gate_losses import unit_gate_inputs, unit_gate_loss, unit_surprises
from onn_jax.training.metrics import unit_metrics
from onn_jax.training.options.adaptive_experts import gate_surprise
from onn_jax.training.step import forward_loss, step_taps

# 40 log-spaced bins from 1e-9 to 10; values outside are counted in the end bins.
SURPRISE_EDGES = np.logspace(-9, 1, 41)


class EvalForward(NamedTuple):
    """One eval batch's forward, and the Surprise of every MoE layer from the main loss."""

    main: jax.Array        # mean CE over unmasked labels
    acc: jax.Array
    count: jax.Array       # counted label positions
    ce_BxT: jax.Array      # per-position CE (masked positions included)
    records: tuple         # MoE records of the layers that have a router
    surprises: list | None  # S [N, E] per layer (surprise router only)
    units: UnitRecords = UnitRecords()            # gated heads' and slot embedding's records
    unit_surprises: UnitRecords = UnitRecords()   # their S (surprise routers only)


def eval_forward(cfg: ModelConfig, params: Any, batch: dict) -> EvalForward:
    """The forward and one reverse pass of the main loss into the Surprise taps (no parameter
    gradient), shared by the eval step here and onn-experiment's analysis step."""
    model = Transformer(cfg)
    b, t = batch["inputs"].shape

    def forward(taps, utaps):  # the train step's forward and loss (onn_jax.training.step.forward_loss)
        main, acc, count, ce_BxT, records, units = forward_loss(cfg, model, params, batch, taps, utaps,
                                                                per_token=True)
        return main, (acc, count, records, ce_BxT, units)

    main, pullback, (acc, count, records, ce_BxT, units) = jax.vjp(
        forward, step_taps(cfg, b, t), unit_taps(cfg, b, t), has_aux=True)
    records = tuple(r for r in records if r is not None)
    surprises, usurprises = None, UnitRecords()
    if (cfg.moe.router == "surprise" and records) or cfg.heads.gated or cfg.embed.gated:
        d_taps, d_utaps = pullback(jnp.ones_like(main))
        if cfg.moe.router == "surprise" and records:
            surprise_fn = get_surprise_fn(cfg.moe.surprise)
            surprises = [layer_surprise(surprise_fn, r, d) for r, d in zip(records, d_taps)]
            lives = [layer_params(params, i)["moe"].get("live") for i in range(cfg.num_layers)]
            surprises = [s if live is None else gate_surprise(s, live) for s, live in zip(surprises, lives)]
        usurprises = unit_surprises(cfg, units, d_utaps)
    return EvalForward(main, acc, count, ce_BxT, records, surprises, units, usurprises)


# Train-step unit metrics that eval leaves out: `threshold_mean` is a parameter, not a held-out
# measurement (the train rows have it); `slots_used` is recounted over the whole eval set.
UNIT_EVAL_SKIPPED = ("threshold_mean", "slots_used")


def unit_eval_sums(cfg: ModelConfig, params: Any, f: EvalForward, loss_mask_N: jax.Array,
                   onehot_BxD: jax.Array) -> dict[str, jax.Array]:
    """The train step's `attn/*` and `embed/*` metrics (onn_jax.training.metrics.unit_metrics) of one eval
    batch, as `attn_*` / `embed_*` (all but UNIT_EVAL_SKIPPED; the gate losses are their values
    on the batch, no gradient), and each domain's head / slot assignments."""
    _, per_kind = unit_gate_loss(cfg, unit_gate_inputs(f.units), f.units, f.unit_surprises, loss_mask_N)
    metrics = unit_metrics(cfg, params, f.units, f.unit_surprises, per_kind, loss_mask_N)
    out = {k.replace("/", "_", 1): v for k, v in metrics.items() if k.split("/", 1)[1] not in UNIT_EVAL_SKIPPED}
    b = onehot_BxD.shape[0]
    positions_D = onehot_BxD.sum(0) * (loss_mask_N.shape[0] // b)
    if f.units.heads:  # [D, L, H] active heads summed over each domain's positions
        load_LxBxH = jnp.stack([r.router.mask.astype(jnp.float32).reshape(b, -1, r.router.mask.shape[-1]).sum(1)
                                for r in f.units.heads])
        out["domain_head_assign"] = jnp.einsum("bd,lbh->dlh", onehot_BxD, load_LxBxH)
        out["domain_head_positions"] = positions_D
    if f.units.embed is not None:  # [D, M] active slots summed over each domain's positions
        mask_NxM = f.units.embed.router.mask.astype(jnp.float32)
        out["domain_slot_assign"] = onehot_BxD.T @ mask_NxM.reshape(b, -1, mask_NxM.shape[-1]).sum(1)
        out["domain_slot_positions"] = positions_D
    return out


def make_eval_step(cfg: ModelConfig, num_domains: int, edges: np.ndarray = SURPRISE_EDGES,
                   mesh=None) -> Callable:
    """Jitted `(params, batch) -> sums` of one eval batch (`evaluate` turns them into means).

    Per domain d (batch["domain"] == d; -1 rows are padding) it also sums the loss, the
    counted tokens and each layer's expert assignments, for routing analysis by domain.
    With `mesh`, the step is the sharded train step's twin: batch rows split along the batch
    axes, traced under the mesh's activation rules (so a dropless layer runs per device in its
    shard_map, as in training) and the sums replicated; feed it global batches
    (`evaluate(..., place=...)`).
    """
    edges = jnp.asarray(edges, jnp.float32)

    def eval_step(params, batch):
        if mesh is None:
            return eval_sums(params, batch)
        from onn_jax.parallel.constrain import activation_rules
        with activation_rules(mesh):
            return eval_sums(params, batch)

    def eval_sums(params, batch):
        b, t = batch["inputs"].shape
        f = eval_forward(cfg, params, batch)
        out = {"main_loss": f.main * f.count, "main_acc": f.acc * f.count, "tokens": f.count}
        onehot_BxD = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)  # -1 -> zeros
        mask_BxT = batch["loss_mask"].astype(jnp.float32)
        out["domain_tokens"] = onehot_BxD.T @ jnp.sum(mask_BxT, -1)
        out["domain_loss"] = onehot_BxD.T @ jnp.sum(f.ce_BxT * mask_BxT, -1)
        if f.units.heads or f.units.embed is not None:
            out.update(unit_eval_sums(cfg, params, f, batch["loss_mask"].reshape(-1), onehot_BxD))
        records = f.records
        if not records:
            return out
        load_LxBxE = jnp.stack([r.router.mask.astype(jnp.float32).reshape(b, t, -1).sum(1) for r in records])
        out["domain_assign"] = jnp.einsum("bd,lbe->dle", onehot_BxD, load_LxBxE)
        out["domain_positions"] = onehot_BxD.sum(0) * t
        out["expert_load"] = jnp.stack([jnp.mean(r.router.mask.astype(jnp.float32), 0) for r in records])
        out.update({k.split("/", 1)[1]: v for k, v in routing_metrics(
            records, f.surprises if f.surprises is not None else (None,) * len(records), cfg.moe.router).items()})
        out["avg_k"] = jnp.mean(jnp.stack([jnp.mean(jnp.sum(r.router.mask, -1).astype(jnp.float32))
                                           for r in records]))
        if f.surprises is not None:
            hists, zeros, accs = [], [], []
            for r, s in zip(records, f.surprises):
                active = r.router.mask
                clipped = jnp.clip(s, edges[0], edges[-1]).ravel()
                hists.append(jnp.histogram(clipped, bins=edges, weights=(active & (s > 0)).ravel())[0])
                zeros.append(jnp.sum(active & (s == 0)) / jnp.maximum(jnp.sum(active), 1))
                accs.append(gate_accuracy(r.router.pre, s))
            out.update(surprise_hist=jnp.stack(hists), surprise_zero_frac=jnp.stack(zeros),
                       gate_acc=jnp.mean(jnp.stack(accs)))
        return out

    if mesh is None:
        return jax.jit(eval_step)
    from jax.sharding import NamedSharding, PartitionSpec

    from onn_jax.parallel.rules import batch_sharding
    return jax.jit(eval_step, in_shardings=(None, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(eval_step: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]],
             edges: np.ndarray = SURPRISE_EDGES, place: Callable | None = None) -> dict[str, Any]:
    """Runs eval_step over `batches`; returns `eval/...` metrics (token-weighted means,
    summed histogram counts, per-batch means of the routing metrics).

    place: host batch -> global device batch (a mesh eval step's input; in a multi-process run
    each process holds its rows and the sums come back global). Without it each process
    evaluates its own rows and the sums are added up across processes here."""
    sums: dict[str, np.ndarray] = {}
    n = 0
    for batch in batches:
        batch = {k: batch[k] for k in ("inputs", "targets", "loss_mask", "domain")}
        out = jax.device_get(eval_step(params, batch if place is None else place(batch)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
        n += 1
    if jax.process_count() > 1 and place is None:  # each process saw its rows: add them up
        from jax.experimental import multihost_utils
        gathered = multihost_utils.process_allgather({k: np.asarray(v) for k, v in sorted(sums.items())})
        sums = {k: np.asarray(v, np.float64).sum(0) for k, v in gathered.items()}
        n *= jax.process_count()
    if n == 0:
        return {}
    tokens = max(float(sums.pop("tokens")), 1.0)
    metrics = {"eval/main_loss": float(sums.pop("main_loss")) / tokens,
               "eval/main_acc": float(sums.pop("main_acc")) / tokens,
               "eval/tokens": tokens, "eval/batches": n}
    d_tokens = sums.pop("domain_tokens")
    metrics["eval/domain_loss"] = np.where(d_tokens > 0, sums.pop("domain_loss") / np.maximum(d_tokens, 1), np.nan)
    # [D, L, E|H] / [D, M]: share of each domain's positions routed to each expert / using each
    # head / slot; NaN for a domain without eval positions (no measurement, not a load of 0)
    for assign, positions, name in (("domain_assign", "domain_positions", "domain_expert_load"),
                                    ("domain_head_assign", "domain_head_positions", "domain_head_load"),
                                    ("domain_slot_assign", "domain_slot_positions", "domain_slot_load")):
        if assign in sums:
            count_D, load = sums.pop(positions), sums.pop(assign)
            count = count_D.reshape(-1, *[1] * (load.ndim - 1))
            metrics[f"eval/{name}"] = np.where(count > 0, load / np.maximum(count, 1), np.nan)
    if "surprise_hist" in sums:
        metrics["eval/surprise_hist"] = sums.pop("surprise_hist")
        metrics["eval/surprise_edges"] = np.asarray(edges, np.float64)
    for k, v in sums.items():
        metrics[f"eval/{k}"] = v / n
    if "eval/expert_load" in metrics:  # experts below the load floor over the eval batches
        metrics["eval/dead_experts"] = dead_experts(metrics["eval/expert_load"])
    if "eval/embed_slot_load" in metrics:  # slots active for some token of some eval batch
        metrics["eval/embed_slots_used"] = float(np.sum(metrics["eval/embed_slot_load"] > 0))
    return metrics
