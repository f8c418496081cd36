"""The `analysis/*` evaluation of a run on the held-out split of all builtin domains: loss per
domain, avg_k (per layer, per domain), expert<->domain NMI, gate accuracy on unmasked tokens,
fallback and inactive hard targets, for the MoE and for gated heads and slots
(onn_jax.core.analysis). A jitted step sums each batch; analyse() turns the sums into metrics.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def make_analysis_step(model_cfg, num_domains: int):
    """Jitted (params, batch) -> sums for onn_jax.core.analysis metrics over one eval batch."""
    import jax
    import jax.numpy as jnp

    from onn_jax.core import analysis as an
    from train.run.evaluate import eval_forward

    def step(params, batch):
        t = batch["inputs"].shape[1]
        f = eval_forward(model_cfg, params, batch)
        out = dict(zip(("loss_sum", "loss_tokens"),
                       an.domain_loss_sums(f.ce_BxT, batch["loss_mask"], batch["domain"], num_domains)))
        dom_N = jnp.repeat(batch["domain"], t)
        unmasked = batch["loss_mask"].reshape(-1)
        out["tokens"] = an.domain_token_counts(dom_N, num_domains)
        if f.units.heads:  # gated attention heads: the same sums per layer, keys head_*
            out.update(unit_sums("head", f.units.heads, f.unit_surprises.heads, dom_N, unmasked, num_domains,
                                 top_any=model_cfg.heads.router == "surprise"))
        if f.units.embed is not None:  # slot embedding: one "layer" of M slots, keys slot_*
            s_ = None if f.unit_surprises.embed is None else (f.unit_surprises.embed,)
            out.update(unit_sums("slot", (f.units.embed,), s_, dom_N, unmasked, num_domains, top_any=True))
        records = f.records
        if not records:
            return out
        out["counts"] = jnp.stack([an.domain_expert_counts(r.router.mask, dom_N, num_domains) for r in records])
        if f.surprises is not None:
            valid_N = (dom_N >= 0).astype(jnp.float32)
            out["fallback"] = jnp.stack([an.fallback_count(r.router.pre, valid_N) for r in records])
            hits = [an.gate_hits(r.router.pre, s_, unmasked) for r, s_ in zip(records, f.surprises)]
            out["gate_hits"] = jnp.stack([h for h, _ in hits])
            out["gate_count"] = jnp.stack([c for _, c in hits])
            targets = [an.surprise_target_counts(s_, r.router.mask, unmasked)
                       for r, s_ in zip(records, f.surprises)]
            out["target_inactive"] = jnp.stack([i for i, _ in targets])
            out["target_hist"] = jnp.stack([h for _, h in targets])
        return out

    return jax.jit(step)


def unit_sums(prefix: str, records, surprises, dom_N, unmasked_N, num_domains: int, top_any: bool) -> dict:
    """Sums of gated units beyond the MoE (heads per layer, the slot embedding) over one batch,
    keyed `<prefix>_*`: [L, D, U] (token, active unit) pairs per domain, fallback tokens of a
    top-any gate and, with a Surprise (eval computes it when some gate needs the main-loss
    pullback), gate hits on unmasked tokens and inactive hard targets."""
    import jax.numpy as jnp

    from onn_jax.core import analysis as an
    out = {f"{prefix}_counts": jnp.stack([an.domain_expert_counts(r.router.mask, dom_N, num_domains)
                                          for r in records])}
    if top_any:
        valid_N = (dom_N >= 0).astype(jnp.float32)
        out[f"{prefix}_fallback"] = jnp.stack([an.fallback_count(r.router.pre, valid_N) for r in records])
    if surprises is not None:
        hits = [an.gate_hits(r.router.pre, s_, unmasked_N) for r, s_ in zip(records, surprises)]
        out[f"{prefix}_gate_hits"] = jnp.stack([h for h, _ in hits])
        out[f"{prefix}_gate_count"] = jnp.stack([c for _, c in hits])
        out[f"{prefix}_target_inactive"] = jnp.stack(
            [an.surprise_target_counts(s_, r.router.mask, unmasked_N)[0] for r, s_ in zip(records, surprises)])
    return out


def unit_metrics(prefix: str, sums: dict, tokens_D: np.ndarray) -> dict:
    """`analysis/<prefix>_*` from unit_sums' sums: avg_k (mean over layers, per layer, per
    domain), unit<->domain NMI per layer, and fallback / gate accuracy / inactive targets."""
    from onn_jax.core import analysis as an
    counts = sums[f"{prefix}_counts"]  # [L, D, U]
    tokens = max(float(tokens_D.sum()), 1.0)
    m = {f"analysis/{prefix}_layer_avg_k": counts.sum((1, 2)) / tokens}
    m[f"analysis/{prefix}_avg_k"] = float(m[f"analysis/{prefix}_layer_avg_k"].mean())
    m[f"analysis/{prefix}_domain_avg_k"] = np.asarray(an.avg_k_from_counts(counts, tokens_D)).mean(0)
    m[f"analysis/{prefix}_nmi"] = np.asarray(an.nmi_from_counts(counts), np.float64)
    if f"{prefix}_fallback" in sums:
        m[f"analysis/{prefix}_fallback_frac"] = sums[f"{prefix}_fallback"] / tokens
    if f"{prefix}_gate_hits" in sums:
        count = np.maximum(sums[f"{prefix}_gate_count"], 1.0)
        m[f"analysis/{prefix}_gate_acc_unmasked"] = sums[f"{prefix}_gate_hits"] / count
        m[f"analysis/{prefix}_target_inactive_frac"] = sums[f"{prefix}_target_inactive"] / count
    return m


def analyse(step, params, batches, domains: Sequence[str]) -> dict[str, Any]:
    """Sums `step` over batches -> the `analysis/*` metrics (numpy, JSON-ready)."""
    import jax

    from onn_jax.core import analysis as an
    sums: dict[str, np.ndarray] = {}
    for batch in batches:
        out = jax.device_get(step(params, {k: batch[k] for k in ("inputs", "targets", "loss_mask", "domain")}))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
    m = {"analysis/loss": float(sums["loss_sum"].sum() / max(sums["loss_tokens"].sum(), 1.0)),
         "analysis/domain_loss": np.asarray(an.domain_means(sums["loss_sum"], sums["loss_tokens"]))}
    for prefix in ("head", "slot"):
        if f"{prefix}_counts" in sums:
            m.update(unit_metrics(prefix, sums, sums["tokens"]))
    if "counts" in sums:
        counts = sums["counts"]  # [L, D, E]
        m["analysis/layer_avg_k"] = counts.sum((1, 2)) / max(sums["tokens"].sum(), 1.0)  # [L]
        m["analysis/avg_k"] = float(m["analysis/layer_avg_k"].mean())
        m["analysis/domain_avg_k"] = np.asarray(an.avg_k_from_counts(counts, sums["tokens"])).mean(0)
        m["analysis/nmi"] = np.asarray(an.nmi_from_counts(counts), np.float64)
        m["analysis/domain_expert_share"] = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    if "gate_hits" in sums:
        count = np.maximum(sums["gate_count"], 1.0)  # [L] unmasked tokens
        m["analysis/gate_acc_unmasked"] = sums["gate_hits"] / count
        m["analysis/target_inactive_frac"] = sums["target_inactive"] / count
        m["analysis/target_share"] = sums["target_hist"] / count[:, None]  # [L, E]
        m["analysis/target_expert0"] = m["analysis/target_share"][:, 0]
        m["analysis/fallback_frac"] = sums["fallback"] / max(sums["tokens"].sum(), 1.0)  # [L]
    return m
