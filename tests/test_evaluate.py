"""The eval step: token-weighted loss, per-domain sums, the same numbers under sparse dispatch, and
the slot embedding's routing metrics when it alone is gated (more in test_embed)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_batch, tiny_config

from onn_jax.config import EmbedConfig
from onn_jax.core.losses import next_token_loss
from onn_jax.nn.transformer import Transformer, init_params
from onn_jax.training.step import compute_grads
from train.run.evaluate import UNIT_EVAL_SKIPPED, evaluate, make_eval_step


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


def test_eval_reports_the_train_steps_embed_metrics_when_only_the_slots_are_gated():
    """eval/embed_* are the train step's embed/* (same params and batches, mean over batches) when
    the slot gate alone asks for the Surprise pass (top-k MoE, dense heads: no attn/*). The case
    with the MoE, the heads and the slots gated, and a NumPy re-statement, is in test_embed."""
    cfg = dataclasses.replace(tiny_config(num_layers=1, router="topk"),
                              embed=EmbedConfig(kind="slots", num_slots=12, code_dim=6, gate_tokens="unmasked"))
    params = init_params(cfg, jax.random.key(5))
    batches = [_batch(4), _batch(5)]
    m = evaluate(make_eval_step(cfg, num_domains=3), params, batches)  # domain 2 has no rows
    step = jax.jit(lambda p, b: compute_grads(p, b, cfg)[1])
    train = [step(params, {k: jnp.asarray(b[k]) for k in ("inputs", "targets", "loss_mask")}) for b in batches]
    keys = [k for k in train[0] if k.startswith(("attn/", "embed/"))]
    assert {"embed/avg_k", "embed/slot_load", "embed/gate_acc", "embed/gate_acc_informative", "embed/gate_loss",
            "embed/fallback_frac", "embed/target_inactive", "embed/surprise_mean"} <= set(keys)
    assert not [k for k in list(keys) + list(m) if "attn" in k or "domain_head" in k]
    for k in keys:
        name = "eval/" + k.replace("/", "_", 1)
        if k.split("/", 1)[1] in UNIT_EVAL_SKIPPED:
            assert k.endswith("slots_used") == (name in m), k
            continue
        want = np.mean([np.asarray(r[k], np.float64) for r in train], 0)
        np.testing.assert_allclose(m[name], want, rtol=1e-5, atol=1e-6, err_msg=k)
    # slots used in some eval batch: the union over the batches; [D, M] per domain (rows 0, 1)
    assert m["eval/embed_slots_used"] == np.sum(np.max([r["embed/slot_load"] for r in train], 0) > 0)
    np.testing.assert_allclose(m["eval/domain_slot_load"][:2].mean(0), m["eval/embed_slot_load"], rtol=1e-6)
    assert np.all(np.isnan(m["eval/domain_slot_load"][2])) and np.all(np.isnan(m["eval/domain_expert_load"][2]))
    assert np.all(np.isfinite(m["eval/domain_expert_load"][:2]))
