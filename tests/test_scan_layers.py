"""model.scan_layers: the blocks as one nn.scan over stacked parameters give the unrolled
model's step (float32): loss, every layer's S, gate losses, gradients and updated parameters,
compared after mapping the stacked tree to the per-layer one (onn_jax.nn.layer_stack); sharded,
decoding, dropless + DeepEmbed, checkpoints and the export converter both ways."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import needs_devices, random_batch, rel_err, tiny_config

from onn_jax.config import Config, ConfigError, MeshConfig, OptimConfig, from_dict, to_dict
from onn_jax.core.losses import next_token_loss
from onn_jax.core.surprise_registry import get_surprise_fn
from onn_jax.nn.attention import init_cache
from onn_jax.nn.layer_stack import layer_params, stack_layers, to_layout, unstack_layers
from onn_jax.nn.moe import layer_surprise
from onn_jax.nn.transformer import Transformer, init_params
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, step_taps, train_step

CFG = tiny_config(num_layers=2)
SCFG = dataclasses.replace(CFG, scan_layers=True)
BATCH = random_batch(0, batch=8, length=8)
TX = make_optimizer(OptimConfig())


def surprises(cfg, params, batch):
    """Every layer's S from the gradient with respect to the zero taps (an independent path)."""
    taps = step_taps(cfg, *batch["inputs"].shape)

    def loss(taps):
        logits, records = Transformer(cfg).apply({"params": params}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0], records
    d_taps, records = jax.grad(loss, has_aux=True)(taps)
    return [layer_surprise(get_surprise_fn(cfg.moe.surprise), r, d) for r, d in zip(records, d_taps)]


def step_and_checks(st, batch, cfg, tx=TX, surprise_fn=None):
    """The train step, its metrics plus every layer's S and the gradients (per-layer layout)."""
    new, metrics = train_step(st, batch, cfg, tx, surprise_fn)
    grads = compute_grads(st.params, batch, cfg)[0]
    return new, {**metrics, "test/S": jnp.stack(surprises(cfg, st.params, batch)),
                 "test/grads": to_layout(grads, False)}


@pytest.fixture(scope="module")
def unrolled():
    state = init_state(CFG, TX, jax.random.key(0))
    new, metrics = jax.jit(lambda st: step_and_checks(st, BATCH, CFG))(state)
    return state, new, metrics


def check_step(new, metrics, ref_new, ref_metrics):
    ref_grads, grads = ref_metrics.pop("test/grads"), metrics.pop("test/grads")
    assert rel_err(grads, ref_grads) < 1e-5  # every gradient, stacked tree mapped to per-layer
    for key, v in ref_metrics.items():
        assert np.allclose(metrics[key], v, rtol=1e-5, atol=1e-7), key  # loss, S, gate losses, ...
    for s_l, ref in zip(metrics["test/S"], ref_metrics["test/S"]):
        assert rel_err(s_l, ref) < 1e-6  # S of every layer
    assert metrics["moe/expert_load"].shape == (2, 8)  # per-layer metrics stay per layer
    assert rel_err(unstack_layers(new.params), ref_new.params) < 1e-5
    counts = new.opt_state[-1].counts["blocks"]["moe"]["experts"]["w1"]
    ref = np.stack([ref_new.opt_state[-1].counts[f"block_{i}"]["moe"]["experts"]["w1"] for i in range(2)])
    assert counts.shape == (2, 8) and np.array_equal(counts, ref)  # AdamW counter per (layer, expert)


@needs_devices(8)
@pytest.mark.slow
def test_sharded_scanned_remat_step_equals_the_unrolled_step(unrolled):
    """scan + remat + an 8-device (data, expert, fsdp) mesh against the unrolled one-device step."""
    from onn_jax.parallel.mesh import make_mesh
    from onn_jax.training.sharded import make_sharded_train_step, shard_batch, sharded_init
    state, ref_new, ref_metrics = unrolled
    ref_metrics = dict(ref_metrics)
    scfg = dataclasses.replace(SCFG, remat="block")
    assert rel_err(unstack_layers(init_params(scfg, jax.random.key(0))), state.params) == 0.0  # same init
    mesh = make_mesh(MeshConfig(data=2, expert=2, fsdp=2), jax.devices()[:8])
    sstate = sharded_init(scfg, TX, jax.random.key(0), mesh)
    assert set(sstate.params) == {"embed", "lm_head", "blocks"}
    w1 = sstate.params["blocks"]["moe"]["experts"]["w1"]
    assert w1.shape == (2, 8, 16, 16)
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp")  # layer axis replicated
    step = make_sharded_train_step(scfg, TX, mesh, donate=False, step_fn=step_and_checks)
    new, metrics = step(sstate, shard_batch(BATCH, mesh))
    check_step(new, metrics, ref_new, ref_metrics)


TOKEN_SIZES = {3, 7, 21}  # B, T, N: no model dimension has these sizes


@pytest.mark.slow
def test_surprise_backward_under_scan_has_no_parameter_gradient():
    """What holds of the cheap Surprise backward under scan: no parameter gradient is computed
    (the scan's dead weight-gradient accumulators are removed). What does not: the backward scan
    runs over every block, so the lowest block's attention backward is computed too."""
    params = init_params(SCFG, jax.random.key(0))
    batch = random_batch(1, batch=3, length=7)

    def loss(p, taps):
        logits, _ = Transformer(SCFG).apply({"params": p}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    def dots(fn):
        text = jax.jit(fn).lower(params, step_taps(SCFG, 3, 7)).compile().as_text()
        return [tuple(int(d) for d in m.group(1).split(",") if d)
                for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} dot\(", text)]
    surprise, full = dots(jax.grad(loss, argnums=1)), dots(jax.grad(loss, argnums=0))
    assert surprise and all(TOKEN_SIZES & set(s) for s in surprise)
    assert not all(TOKEN_SIZES & set(s) for s in full)  # the check can fail: weight grads lack them


@pytest.mark.slow
def test_decoding_dropless_gated_heads_and_deep_embed_under_scan():
    """Phase-2 units and dropless dispatch in one scanned model: gradients and every metric
    (per-layer expert / head load, head Surprise) equal the unrolled model's."""
    cfg = tiny_config(num_layers=2, dispatch="dropless", pair_budget=2.0)
    cfg = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, deep=True),
                              heads=dataclasses.replace(cfg.heads, router="surprise"))
    scfg = dataclasses.replace(cfg, scan_layers=True)
    params = init_params(cfg, jax.random.key(3))
    sparams = stack_layers(params)
    assert sparams["blocks"]["deep_embed"].shape == (2, 40, 16)
    assert sparams["blocks"]["attn"]["head_thresholds"].shape == (2, 2)
    grads = jax.jit(lambda p, c: compute_grads(p, BATCH, c), static_argnums=1)
    (g, m), (sg, sm) = grads(params, cfg), grads(sparams, scfg)
    assert rel_err(unstack_layers(sg), g) < 1e-5
    assert {"attn/head_load", "attn/surprise_mean", "moe/expert_load"} <= set(m)
    for key, v in m.items():
        assert np.allclose(np.asarray(sm[key], float), np.asarray(v, float), rtol=1e-5, atol=1e-7), key
    # decoding with a KV cache: the scanned model writes the same cache and logits
    p = init_params(CFG, jax.random.key(4))
    positions = jnp.broadcast_to(jnp.arange(8), (8, 8))
    decode = jax.jit(lambda p, c: Transformer(c).apply({"params": p}, BATCH["inputs"], positions_BxT=positions,
                                                       cache=init_cache(c, 8, 16)), static_argnums=1)
    logits, _, cache = decode(p, CFG)
    slogits, _, scache = decode(stack_layers(p), SCFG)
    assert rel_err(slogits, logits) < 1e-6 and rel_err(scache.layers, cache.layers) < 1e-6
    assert np.array_equal(scache.valid, cache.valid)


def test_layouts_convert_both_ways_through_checkpoints_and_export(tmp_path):
    from onn_jax.io.checkpoint_meta import make_meta
    from onn_jax.io.checkpointer import Checkpointer
    from onn_jax.io.portable import load_export, write_export
    from onn_jax.io.restore_targets import abstract_like
    params = init_params(CFG, jax.random.key(1))
    sparams = stack_layers(params)
    assert rel_err(unstack_layers(sparams), params) == 0.0
    assert rel_err(stack_layers(unstack_layers(sparams)), sparams) == 0.0
    assert to_layout(params, False) is params and rel_err(layer_params(sparams, 1), params["block_1"]) == 0.0
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(sparams)
    # a scanned checkpoint restores into a scanned model (state incl. the [L, E] AdamW counters)
    state = init_state(SCFG, TX, jax.random.key(1))
    for name, p, cfg in (("scan", sparams, SCFG), ("plain", params, CFG)):
        meta = make_meta(config={"model": to_dict(cfg), "data": {"tokenizer": "byte"}})
        with Checkpointer(tmp_path / name, save_every=1) as ck:
            ck.save(3, {"params": p} if name == "plain" else state, meta)
    with Checkpointer(tmp_path / "scan", read_only=True) as ck:
        restored, _ = ck.restore(abstract_like(init_state, SCFG, TX, jax.random.key(0)))
    assert rel_err(restored, state) == 0.0
    # onn-export converts: stacked -> per_layer and per_layer -> stacked; the config follows
    apply = jax.jit(lambda p, c: Transformer(c).apply({"params": p}, BATCH["inputs"])[0], static_argnums=1)
    ref = apply(params, CFG)
    for name, layout, want in (("scan", "per_layer", params), ("plain", "stacked", sparams)):
        write_export(tmp_path / name, tmp_path / f"{name}_out", fmt="npz", layout=layout)
        ex = load_export(tmp_path / f"{name}_out")
        assert ex.model_cfg.scan_layers == (layout == "stacked")
        assert rel_err(ex.params, want) == 0.0
        assert rel_err(apply(ex.params, ex.model_cfg), ref) < 1e-6


@pytest.mark.parametrize("overrides,field", [
    ({"model": {"moe": {"router": "topk", "aux_free_rate": 0.01}}}, "model.moe.aux_free_rate"),
    ({"model": {"moe": {"adaptive_experts": True}}}, "model.moe.adaptive_experts"),
    ({"optim": {"grad_filter": {"scope": "per_layer"}}}, "optim.grad_filter.scope"),
    ({"model": {"scan_layers": 1}}, "model.scan_layers"),
])
def test_options_scan_cannot_serve_are_refused_by_field(overrides, field):
    d = {"model": {"scan_layers": True}}
    for k, v in overrides.items():
        d[k] = {**d.get(k, {}), **v}
    with pytest.raises(ConfigError, match=re.escape(field)):
        from_dict(Config, d)
