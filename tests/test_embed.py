"""Sparse embeddings (model.embed): slots vs nn.Embed, closed-form Surprise vs autodiff,
DeepEmbed, the n-gram memory's causality and hash, and the two-pass step with everything gated."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import ConfigError, EmbedConfig, HeadsConfig
from onn_jax.core.losses import hybrid_gate_loss, next_token_loss
from onn_jax.core.surprise import SurpriseInputs, output_grad_surprise
from onn_jax.core.surprise_variants import advantage_surprise
from onn_jax.nn.embed import ngram_bucket_ids, previous_ids, slot_embed, slot_surprise
from onn_jax.nn.generate import generate
from onn_jax.nn.transformer import Transformer, init_params, model_taps
from onn_jax.nn.units import unit_records, unit_taps
from onn_jax.training.step import compute_grads
from train.plots.dashboards import make_dashboards
from train.run.evaluate import evaluate, make_eval_step
from train.run.metrics_writer import MetricsWriter
from train.run.progress import progress_fields


def embed_config(**embed):
    return dataclasses.replace(tiny_config(), embed=EmbedConfig(**embed))


def test_slots_with_one_hot_codes_and_identity_prototypes_are_a_lookup_table():
    """V = M, Z one-hot, P = I, theta = 0: slot id_t has cosine 1 (pre 0.5 > 0), every other
    slot cosine 0 (pre -0.5), so only slot id_t is active, with weight 1: nn.Embed with table S."""
    v = 6
    params = {"codes": jnp.eye(v), "slot_prototypes": jnp.eye(v), "slot_thresholds": jnp.zeros(v),
              "slots": jnp.arange(v * 4, dtype=jnp.float32).reshape(v, 4)}
    ids = jnp.asarray([3, 0, 5, 5, 1])
    x0, rec = slot_embed(params, ids, fallback_k=3)
    np.testing.assert_array_equal(np.asarray(rec.router.mask), np.eye(v, dtype=bool)[ids])
    np.testing.assert_allclose(x0, params["slots"][ids], rtol=1e-6)


def test_slot_surprise_closed_forms_equal_the_dense_unit_formulas_and_jvp():
    rng = np.random.default_rng(0)
    n, v, z, m, c = 7, 9, 4, 6, 5
    params = {"codes": jnp.asarray(rng.normal(size=(v, z)), jnp.float32),
              "slot_prototypes": jnp.asarray(rng.normal(size=(z, m)), jnp.float32),
              "slot_thresholds": jnp.asarray(rng.normal(size=m), jnp.float32),
              "slots": jnp.asarray(rng.normal(size=(m, c)), jnp.float32)}
    ids = jnp.asarray(rng.integers(0, v, n))
    head = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
    loss_of_x0 = lambda x0: jnp.sum(jnp.tanh(x0 @ head))
    x0, rec = slot_embed(params, ids, fallback_k=2)
    g = jax.grad(loss_of_x0)(x0)
    # The dense unit layout [N, M, C] (Y[t,m] = S_m), built only here, for the shared formulas.
    y = jnp.broadcast_to(rec.slots, (n, m, c))
    d_y = jax.jacrev(lambda yy: loss_of_x0(jnp.einsum("nm,nmc->nc", rec.router.weights, yy)))(y)
    inp = SurpriseInputs(d_y, g, y, rec.router.weights, rec.router.mask)
    for name in ("output_grad", "output_grad_closed"):
        np.testing.assert_allclose(slot_surprise(name, rec, g), output_grad_surprise(inp), rtol=1e-5, atol=1e-7)
    a = slot_surprise("advantage", rec, g)
    np.testing.assert_allclose(a, advantage_surprise(inp), rtol=1e-5, atol=1e-6)
    for t, u in [(0, 0), (3, 5), (6, 2)]:  # jvp along w_t -> (1 - e) w_t + e onehot(u)
        f = lambda e: loss_of_x0(x0.at[t].set((1 - e) * x0[t] + e * rec.slots[u]))
        _, d = jax.jvp(f, (0.0,), (1.0,))
        np.testing.assert_allclose(a[t, u], d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="learning_cost"):
        slot_surprise("learning_cost", rec, g)
    with pytest.raises(ConfigError, match="model.embed.surprise"):
        EmbedConfig(kind="slots", surprise="learning_cost")
    with pytest.raises(ConfigError, match="model.embed.ngram"):
        EmbedConfig(ngram=4)


def test_deep_embed_at_one_equals_off_and_its_gradient_is_moe_out_times_g():
    cfg = embed_config(deep=True)
    params = init_params(cfg, jax.random.key(1))
    off = {k: ({kk: vv for kk, vv in v.items() if kk != "deep_embed"} if k.startswith("block_") else v)
           for k, v in params.items()}
    batch = random_batch(1)
    run = jax.jit(lambda c, p: Transformer(c).apply({"params": p}, batch["inputs"])[0], static_argnums=0)
    np.testing.assert_allclose(run(cfg, params), run(tiny_config(), off), rtol=1e-6, atol=1e-6)
    # dL/dD_l[v] = sum_{t: id_t = v} moe_out_t * dL/dh_t: ids absent from the batch get none.
    loss = lambda p: next_token_loss(Transformer(cfg).apply({"params": p}, batch["inputs"])[0],
                                     batch["targets"], batch["loss_mask"])[0]
    g = jax.jit(jax.grad(loss))(params)["block_0"]["deep_embed"]
    present = np.unique(np.asarray(batch["inputs"]))
    absent = np.setdiff1d(np.arange(cfg.vocab_size), present)
    assert np.all(np.asarray(g)[absent] == 0) and np.any(np.asarray(g)[present] != 0)


def test_ngram_hash_is_a_pure_function_and_the_memory_is_causal_with_exact_kv_decoding():
    ids = jnp.asarray([[5, 7, 7, 1, 0, 3]])
    ctx = previous_ids(ids, 2, pad_id=40)
    np.testing.assert_array_equal(np.asarray(ctx[0, :, 1]), [40, 5, 7, 7, 1, 0])
    a, b = ngram_bucket_ids(ctx, 3, 2, 97), ngram_bucket_ids(ctx, 3, 2, 97)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 6, 4) and int(a.max()) < 97
    cfg = dataclasses.replace(embed_config(ngram=3, ngram_buckets=64, ngram_dim=8), max_len=32)
    params = init_params(cfg, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (1, 10)), jnp.int32)
    grad_at_4 = jax.jit(jax.grad(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0][0, 4].sum()))(params)
    later = set(np.asarray(tokens[0, 5:]).tolist()) - set(np.asarray(tokens[0, :5]).tolist())
    assert later and all(np.all(np.asarray(grad_at_4["embed"]["embedding"][v]) == 0) for v in later)
    prompt = np.asarray(tokens[0, :5]).tolist()
    new = generate(params, cfg, prompt, max_new_tokens=6)
    logits, _ = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))(params, jnp.asarray([prompt + new]))
    assert new == np.asarray(jnp.argmax(logits[0, 4:-1], -1)).tolist()


def test_unified_gradient_with_moe_heads_and_slot_embedding_gated_equals_naive_two_pass(tmp_path):
    """Also: the eval step, the progress bar and onn-plot on this step's attn/* and embed/*."""
    cfg = dataclasses.replace(tiny_config(num_layers=1), num_heads=4,
                              heads=HeadsConfig(router="surprise", surprise="output_grad_closed", w_aux=0.5),
                              embed=EmbedConfig(kind="slots", num_slots=12, code_dim=6, w_aux=0.3,
                                                gate_tokens="unmasked"))
    params = init_params(cfg, jax.random.key(3))
    batch = random_batch(3)
    b, t = batch["inputs"].shape
    taps, utaps = model_taps(cfg, b, t), unit_taps(cfg, b, t)

    def run(p, tp, utp):
        (logits, moe), st = Transformer(cfg).apply({"params": p}, batch["inputs"], tp, unit_taps=utp,
                                                   mutable=["gated"])
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0], moe, unit_records(cfg, st["gated"])

    def naive(p):
        d_taps, d_utaps = jax.grad(lambda tp, utp: run(p, tp, utp)[0], argnums=(0, 1))(taps, utaps)
        _, moe, units = run(p, taps, utaps)
        s_moe = [jnp.linalg.norm(d.expert_out, axis=-1) for d in d_taps]
        s_heads = [r.router.weights * jnp.linalg.norm(d.moe_out, axis=-1)[:, None]
                   for r, d in zip(units.heads, d_utaps.heads)]
        g, slots = d_utaps.embed, units.embed.slots
        s_emb = g @ slots.T - jnp.sum(g * units.embed.x0, -1)[:, None]  # advantage, written out
        consts = jax.lax.stop_gradient((s_moe, s_heads, s_emb))

        def total(p):
            main, moe, units = run(p, taps, utaps)
            sm, sh, se = consts
            return (main + sum(hybrid_gate_loss(r.router.pre, s)[0] for r, s in zip(moe, sm))
                    + 0.5 * sum(hybrid_gate_loss(r.router.pre, s)[0] for r, s in zip(units.heads, sh))
                    + 0.3 * hybrid_gate_loss(units.embed.router.pre, se,
                                             token_mask_N=batch["loss_mask"].reshape(-1))[0])
        return jax.grad(total)(p), (units.embed.router.mask, units.embed.router.pre, s_emb)

    grads, metrics = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    expected, slot_gate = jax.jit(naive)(params)
    assert rel_err(grads, expected) < 1e-5, rel_err(grads, expected)
    assert rel_err(grads["embed"], expected["embed"]) < 1e-5
    # Only the batch's ids get code gradients.
    absent = np.setdiff1d(np.arange(cfg.vocab_size), np.unique(np.asarray(batch["inputs"])))
    assert np.all(np.asarray(grads["embed"]["codes"])[absent] == 0)
    assert metrics["embed/slot_load"].shape == (12,) and float(metrics["embed/slots_used"]) >= 1
    for key in ("embed/avg_k", "embed/gate_acc", "embed/fallback_frac", "embed/target_inactive", "attn/avg_k"):
        assert np.isfinite(float(metrics[key])), key
    # The progress bar shows the gated heads' and slots' headline numbers (absent without them:
    # test_routing_metrics.test_bar_fields_and_plain_log_line, test_train_cli).
    post = progress_fields(jax.device_get(metrics))
    for label, key in (("attn_k", "attn/avg_k"), ("attn_acc_inf", "attn/gate_acc_informative"),
                       ("emb_k", "embed/avg_k"), ("emb_acc_inf", "embed/gate_acc_informative")):
        assert post[label] == f"{float(metrics[key]):.3f}", label

    # The eval step reports the train step's attn/* and embed/* on the same batch (all but
    # threshold_mean), and the slot gate's numbers equal a NumPy re-statement from its mask, pre
    # and the advantage S written out in `naive`.
    eval_batch = {k: np.asarray(v) for k, v in batch.items()} | {"domain": np.array([1, 0], np.int32)}
    m = evaluate(make_eval_step(cfg, num_domains=2), params, [eval_batch])
    keys = [k for k in metrics if k.startswith(("attn/", "embed/")) and not k.endswith("threshold_mean")]
    assert {"attn/head_load", "attn/gate_acc", "attn/gate_loss", "embed/gate_ce", "embed/slots_used"} <= set(keys)
    for k in keys:
        np.testing.assert_allclose(m["eval/" + k.replace("/", "_", 1)], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    mask, pre, s = (np.asarray(a, np.float64) for a in slot_gate)
    varying = s.max(-1) > s.min(-1)
    assert varying.sum() >= 4  # the unmasked labels' rows at least
    restated = {"avg_k": mask.sum(-1).mean(), "slot_load": mask.mean(0), "fallback_frac": (pre <= 0).all(-1).mean(),
                "gate_acc": (pre.argmax(-1) == s.argmin(-1))[varying].mean(),
                "target_inactive": 1 - mask[np.arange(len(s)), s.argmin(-1)].mean(),
                "slots_used": (mask.sum(0) > 0).sum()}
    for k, want in restated.items():
        np.testing.assert_allclose(m[f"eval/embed_{k}"], want, rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(m["eval/domain_slot_load"], mask.reshape(b, t, -1).mean(1)[::-1], rtol=1e-6)
    # onn-plot draws the units' figures from these rows
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, jax.device_get(metrics))
    w.write(2, {**jax.device_get(metrics), **m})
    w.close()
    assert {p.name for p in make_dashboards(tmp_path)} >= {
        "attn_gate.png", "head_load.png", "domain_heads.png", "embed_gate.png", "slot_load.png", "domain_slots.png"}
