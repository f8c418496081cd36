"""The eval step: token-weighted loss, per-domain sums, the same numbers under sparse dispatch, and
the gated heads' and slot embedding's routing metrics (the train step's, and a NumPy re-statement)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from helpers import random_batch, tiny_config
from onn_jax.config import EmbedConfig, HeadsConfig
from onn_jax.losses import next_token_loss
from onn_jax.model import Transformer, init_params, model_taps
from onn_jax.step import compute_grads
from onn_jax.units import unit_records, unit_taps
from train.evaluate import UNIT_EVAL_SKIPPED, evaluate, make_eval_step
from train.logging import MetricsWriter
from train.plot import make_dashboards


def _batch(seed):
    b = random_batch(seed, batch=2, length=8)
    return {k: np.asarray(v) for k, v in b.items()} | {"domain": np.array([0, 1], np.int32)}


def test_eval_loss_and_domains_match_a_direct_computation():
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.key(0))
    batches = [_batch(1), _batch(2)]
    m = evaluate(make_eval_step(cfg, num_domains=2), params, batches)
    losses, counts = [], []
    for b in batches:
        logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(b["inputs"]))
        loss, _, count = next_token_loss(logits, b["targets"], b["loss_mask"])
        losses.append(float(loss) * float(count))
        counts.append(float(count))
    np.testing.assert_allclose(m["eval/main_loss"], sum(losses) / sum(counts), rtol=1e-5)
    assert m["eval/domain_loss"].shape == (2,) and np.all(np.isfinite(m["eval/domain_loss"]))
    assert m["eval/domain_expert_load"].shape == (2, 2, 8)


def test_eval_under_sparse_dispatch_equals_dense_when_nothing_is_dropped():
    cfg = tiny_config(num_layers=2)
    sparse = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="sparse", capacity_factor=None))
    params = init_params(cfg, jax.random.key(1))
    batches = [_batch(3)]
    dense_m = evaluate(make_eval_step(cfg, num_domains=2), params, batches)
    sparse_m = evaluate(make_eval_step(sparse, num_domains=2), params, batches)
    for key in ("eval/main_loss", "eval/avg_k", "eval/gate_acc", "eval/surprise_zero_frac"):
        np.testing.assert_allclose(sparse_m[key], dense_m[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(sparse_m["eval/surprise_hist"], dense_m["eval/surprise_hist"], atol=1)


def _embed_restated(cfg, params, batch):
    """The slot gate's mask, pre and advantage S [N, M] (g = dL/dx0 by jax.grad on the x0 tap)."""
    b, t = batch["inputs"].shape
    taps, utaps = model_taps(cfg, b, t), unit_taps(cfg, b, t)

    def run(u):
        (logits, _), st = Transformer(cfg).apply({"params": params}, jnp.asarray(batch["inputs"]), taps,
                                                 unit_taps=u, mutable=["gated"])
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0], unit_records(cfg, st["gated"]).embed

    (_, rec), d_u = jax.jit(jax.value_and_grad(run, has_aux=True))(utaps)
    g, x0, slots = (np.asarray(a, np.float64) for a in (d_u.embed, rec.x0, rec.slots))
    s_NxM = g @ slots.T - np.sum(g * x0, -1)[:, None]  # advantage: <g_t, slot_m - x0_t>
    return np.asarray(rec.router.mask), np.asarray(rec.router.pre), s_NxM


@pytest.mark.parametrize("routers", [("surprise", "surprise"), ("topk", "dense")], ids=["all_gated", "embed_only"])
def test_eval_reports_the_train_steps_attn_and_embed_metrics(routers, tmp_path):
    """eval/attn_* and eval/embed_* are the train step's attn/* and embed/* (same params, same
    batches, mean over batches), and the slot gate's numbers equal a NumPy re-statement from its
    mask, pre and S. In `embed_only` (top-k MoE, dense heads) only the slot gate asks for the
    Surprise pass. onn-plot draws the units' figures from these rows, those of the gated kinds only."""
    moe_router, head_router = routers
    cfg = dataclasses.replace(tiny_config(num_layers=1, router=moe_router), num_heads=4,
                              heads=HeadsConfig(router=head_router, top_k=2),
                              embed=EmbedConfig(kind="slots", num_slots=12, code_dim=6, gate_tokens="unmasked"))
    params = init_params(cfg, jax.random.key(5))
    batches = [_batch(4), _batch(5)]
    m = evaluate(make_eval_step(cfg, num_domains=2), params, batches)
    step = jax.jit(lambda p, b: compute_grads(p, b, cfg)[1])
    train = [step(params, {k: jnp.asarray(b[k]) for k in ("inputs", "targets", "loss_mask")}) for b in batches]
    keys = [k for k in train[0] if k.startswith(("attn/", "embed/"))]
    assert {"embed/avg_k", "embed/slot_load", "embed/gate_acc", "embed/gate_loss", "embed/fallback_frac",
            "embed/target_inactive"} <= set(keys)
    assert ({"attn/avg_k", "attn/head_load", "attn/gate_acc"} <= set(keys)) == (head_router == "surprise")
    assert any(k.startswith("attn/") for k in keys) == (head_router != "dense")
    for k in keys:
        name = "eval/" + k.replace("/", "_", 1)
        if k.split("/", 1)[1] in UNIT_EVAL_SKIPPED:
            assert k.endswith("slots_used") == (name in m), k  # recounted over the eval set (below)
            continue
        want = np.mean([np.asarray(r[k], np.float64) for r in train], 0)
        np.testing.assert_allclose(m[name], want, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(k.startswith("eval/attn_") for k in m) == (head_router != "dense")

    masks, pres, surprises = zip(*(_embed_restated(cfg, params, b) for b in batches))
    mean = lambda f: np.mean([f(*x) for x in zip(masks, pres, surprises)], 0)
    np.testing.assert_allclose(m["eval/embed_avg_k"], mean(lambda k, p, s: k.sum(-1).mean()), rtol=1e-6)
    np.testing.assert_allclose(m["eval/embed_slot_load"], mean(lambda k, p, s: k.mean(0)), rtol=1e-6)
    np.testing.assert_allclose(m["eval/embed_fallback_frac"], mean(lambda k, p, s: (p <= 0).all(-1).mean()), rtol=1e-6)

    def acc(k, p, s):
        varying = s.max(-1) > s.min(-1)
        return (p.argmax(-1) == s.argmin(-1))[varying].mean()
    np.testing.assert_allclose(m["eval/embed_gate_acc"], mean(acc), rtol=1e-6)
    np.testing.assert_allclose(m["eval/embed_target_inactive"],
                               mean(lambda k, p, s: 1 - k[np.arange(len(s)), s.argmin(-1)].mean()), rtol=1e-6)
    assert m["eval/embed_slots_used"] == np.any(np.concatenate(masks), 0).sum()
    # [D, M]: each domain's share of positions using each slot (batch rows are domains 0 and 1)
    t = batches[0]["inputs"].shape[1]
    want = np.stack([np.concatenate([k.reshape(2, t, -1)[d] for k in masks]).mean(0) for d in range(2)])
    np.testing.assert_allclose(m["eval/domain_slot_load"], want, rtol=1e-6)
    assert ("eval/domain_head_load" in m) == (head_router != "dense")
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, train[0])
    w.write(2, {**train[1], **m})
    w.close()
    unit_plots = {p.name for p in make_dashboards(tmp_path)} - {
        "loss.png", "gate.png", "expert_load.png", "surprise.png", "domain_routing.png"}
    heads = {"attn_gate.png", "head_load.png", "domain_heads.png"} if head_router != "dense" else set()
    assert unit_plots == {"embed_gate.png", "slot_load.png", "domain_slots.png"} | heads
