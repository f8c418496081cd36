"""Held-out evaluation: main loss and accuracy, routing metrics and a Surprise histogram.

The eval step runs the forward and one reverse pass of the main loss into the Surprise
taps (as the train step does, without any parameter gradient), so the histogram shows the
very S the gate is trained on. The histogram counts active (token, expert) pairs with S > 0
(the faithful S is exactly 0 on inactive pairs); `eval/surprise_zero_frac` is the share of
active pairs with S == 0 (e.g. positions whose loss is masked, in the last layer).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onn_jax.adaptive_experts import gate_surprise
from onn_jax.analysis import gate_accuracy
from onn_jax.config import ModelConfig
from onn_jax.losses import next_token_loss
from onn_jax.model import Transformer
from onn_jax.step import step_taps
from onn_jax.moe import layer_surprise
from onn_jax.surprise import get_surprise_fn

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


def eval_forward(cfg: ModelConfig, params: Any, batch: dict) -> EvalForward:
    """The forward and one reverse pass of the main loss into the Surprise taps (no parameter
    gradient), shared by the eval step here and onn-experiment's analysis step."""
    model = Transformer(cfg)
    b, t = batch["inputs"].shape

    def forward(taps):
        logits, records = model.apply({"params": params}, batch["inputs"], taps)
        main, acc, count = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return main, (acc, count, records, ce_BxT)

    main, pullback, (acc, count, records, ce_BxT) = jax.vjp(forward, step_taps(cfg, b, t), has_aux=True)
    records = tuple(r for r in records if r is not None)
    surprises = None
    if cfg.moe.router == "surprise" and records:
        surprise_fn = get_surprise_fn(cfg.moe.surprise)
        (d_taps,) = pullback(jnp.ones_like(main))
        surprises = [layer_surprise(surprise_fn, r, d) for r, d in zip(records, d_taps)]
        lives = [params[f"block_{i}"]["moe"].get("live") for i in range(cfg.num_layers)]
        surprises = [s if live is None else gate_surprise(s, live) for s, live in zip(surprises, lives)]
    return EvalForward(main, acc, count, ce_BxT, records, surprises)


def make_eval_step(cfg: ModelConfig, num_domains: int, edges: np.ndarray = SURPRISE_EDGES) -> Callable:
    """Jitted `(params, batch) -> sums` of one eval batch (`evaluate` turns them into means).

    Per domain d (batch["domain"] == d; -1 rows are padding) it also sums the loss, the
    counted tokens and each layer's expert assignments, for routing analysis by domain.
    """
    edges = jnp.asarray(edges, jnp.float32)

    def eval_step(params, batch):
        b, t = batch["inputs"].shape
        f = eval_forward(cfg, params, batch)
        out = {"main_loss": f.main * f.count, "main_acc": f.acc * f.count, "tokens": f.count}
        onehot_BxD = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)  # -1 -> zeros
        mask_BxT = batch["loss_mask"].astype(jnp.float32)
        out["domain_tokens"] = onehot_BxD.T @ jnp.sum(mask_BxT, -1)
        out["domain_loss"] = onehot_BxD.T @ jnp.sum(f.ce_BxT * mask_BxT, -1)
        records = f.records
        if not records:
            return out
        load_LxBxE = jnp.stack([r.router.mask.astype(jnp.float32).reshape(b, t, -1).sum(1) for r in records])
        out["domain_assign"] = jnp.einsum("bd,lbe->dle", onehot_BxD, load_LxBxE)
        out["domain_positions"] = onehot_BxD.sum(0) * t
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

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]],
             edges: np.ndarray = SURPRISE_EDGES) -> dict[str, Any]:
    """Runs eval_step over `batches`; returns `eval/...` metrics (token-weighted means,
    summed histogram counts, per-batch means of the routing metrics)."""
    sums: dict[str, np.ndarray] = {}
    n = 0
    for batch in batches:
        out = jax.device_get(eval_step(params, {k: batch[k] for k in ("inputs", "targets", "loss_mask", "domain")}))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
        n += 1
    if jax.process_count() > 1:  # every process saw its rows of each eval batch: add them up
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
    if "domain_assign" in sums:  # [D, L, E] share of each domain's positions routed to each expert
        positions = sums.pop("domain_positions")
        metrics["eval/domain_expert_load"] = sums.pop("domain_assign") / np.maximum(positions, 1)[:, None, None]
    if "surprise_hist" in sums:
        metrics["eval/surprise_hist"] = sums.pop("surprise_hist")
        metrics["eval/surprise_edges"] = np.asarray(edges, np.float64)
    for k, v in sums.items():
        metrics[f"eval/{k}"] = v / n
    return metrics
