"""The eval step: token-weighted loss, per-domain sums, and the same numbers under sparse dispatch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from helpers import random_batch, tiny_config
from onn_jax.losses import next_token_loss
from onn_jax.model import Transformer, init_params
from train.evaluate import evaluate, make_eval_step


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
