"""Expert parallelism of the dropless dispatch (onn_jax.dispatch.expert_parallel) on 8 forced CPU devices.

The sharded step (shard_map + all_to_all over `expert`) equals the one-device dropless step
(float32, rel. 1e-5): loss, every pair's Surprise S, metrics, updated parameters and AdamW
moments (gradients), with uneven loads, an idle expert, fallback tokens and the global pair
budget binding. The per-peer budget's overflow rule is checked against a NumPy re-statement
and a dense reference with the dropped pairs' weights set to 0."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import needs_devices, rel_err
from test_dispatch import layer_params
from test_sharding import assert_tree_close

from onn_jax.config import Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig
from onn_jax.core.experts import combine, expert_outputs
from onn_jax.core.losses import next_token_loss
from onn_jax.core.surprise import output_grad_surprise
from onn_jax.dispatch.expert_parallel import send_rows
from onn_jax.nn.moe import MoETaps, layer_surprise, moe_layer, route
from onn_jax.nn.transformer import Transformer
from onn_jax.parallel.constrain import activation_rules
from onn_jax.parallel.mesh import make_mesh
from onn_jax.parallel.rules import param_shardings
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import make_sharded_train_step, shard_batch, state_shardings
from onn_jax.training.state import init_state
from onn_jax.training.step import step_taps, train_step

# pair_budget 1.25 < avg_k (1.47): the global budget drops pairs; ep_budget E/2 = E/ep at ep = 2 and more
# than E/ep beyond, so no peer buffer overflows and the step must equal one device's.
CFG = ModelConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=2, max_len=16,
                  moe=MoEConfig(num_experts=8, intermediate=16, dispatch="dropless", gemm="ragged_dot",
                                fallback_k=1, pair_budget=1.25, ep_budget=4.0))
TX = make_optimizer(OptimConfig())
B, T = 8, 8


def make_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


def skewed(state):
    """Experts 0-2 busy, 3 rare, 4-6 very rare, 7 idle (a copy of expert 0's prototype that
    never passes its threshold and loses the fallback's tie to expert 0): all busy experts
    live on the first expert shard, so devices get uneven loads."""
    moe = state.params["block_0"]["moe"]
    theta = jnp.asarray([-3.0, -3.0, -3.0, 0.0, 1.0, 1.0, 1.0, 8.0])
    protos = moe["prototypes"].at[:, 7].set(moe["prototypes"][:, 0])
    params = {**state.params, "block_0": {**state.params["block_0"],
                                          "moe": {**moe, "thresholds": theta, "prototypes": protos}}}
    return state.replace(params=params)


def step_with_surprise(state, batch, cfg, tx, surprise_fn=None):
    """train_step, plus every layer's S [L, N, E] from one extra pullback of the main loss."""
    new_state, metrics = train_step(state, batch, cfg, tx, surprise_fn)
    b, t = batch["inputs"].shape

    def main_loss(taps):
        logits, records = Transformer(cfg).apply({"params": state.model_params}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0], records

    (_, records), d_taps = jax.value_and_grad(main_loss, has_aux=True)(step_taps(cfg, b, t))
    metrics["S"] = jnp.stack([layer_surprise(output_grad_surprise, r, d) for r, d in zip(records, d_taps)])
    metrics["kept"] = jnp.stack([r.dispatch.kept_NxE for r in records])
    return new_state, metrics


@pytest.fixture(scope="module")
def reference():
    state0 = skewed(jax.jit(functools.partial(init_state, CFG, TX))(jax.random.key(0)))
    step = jax.jit(functools.partial(step_with_surprise, cfg=CFG, tx=TX))
    state1, metrics = step(state0, make_batch())
    return jax.device_get((state0, state1, metrics))


def test_reference_has_uneven_loads_an_idle_expert_fallbacks_and_drops(reference):
    _, _, m = reference
    load = np.asarray(m["moe/expert_load"])[0]
    assert load[7] == 0 and load[:3].min() > 3 * load[4:7].max()
    assert float(m["moe/fallback_share"]) > 0
    assert 0 < float(m["moe/dropped_frac"]) < 1
    s, kept = np.asarray(m["S"]), np.asarray(m["kept"])
    assert np.all(s[~kept] == 0) and (s[kept] > 0).mean() > 0.5  # 0 also where no loss reaches


@needs_devices(8)
@pytest.mark.parametrize("shape", [(4, 2), (2, 4), (1, 8)], ids=["4x2", "2x4", "1x8"])
def test_expert_parallel_step_equals_one_device(shape, reference):
    state0, state1_ref, metrics_ref = reference
    mesh = make_mesh(MeshConfig(data=shape[0], expert=shape[1]))
    state = jax.device_put(state0, state_shardings(state0, mesh))
    step = make_sharded_train_step(CFG, TX, mesh, donate=False, step_fn=step_with_surprise)
    batch = shard_batch(make_batch(), mesh)
    compiled = step.lower(state, batch).compile()
    state1, metrics = compiled(state, batch)
    for key, ref in metrics_ref.items():
        np.testing.assert_allclose(metrics[key], ref, rtol=1e-5, atol=1e-7, err_msg=key)
    assert_tree_close(state1, state1_ref)
    assert state1.params["block_0"]["moe"]["experts"]["w1"].sharding.spec[0] == "expert"
    # No [N, E, C] tensor anywhere: every f32 buffer of the per-device program is smaller.
    n, e, c = B * T, CFG.moe.num_experts, CFG.hidden
    sizes = [int(np.prod([int(d) for d in dims.split(",")])) for dims in
             re.findall(r"f32\[(\d+(?:,\d+)*)\]", compiled.as_text())]
    assert max(sizes) < n * e * c, max(sizes)


@needs_devices(8)
@pytest.mark.parametrize("data,ep", [(2, 4), (8, 1)], ids=["2x4", "8x1"])
def test_peer_budget_overflow_drops_the_documented_pairs(data, ep):
    """ep_budget 0.75: each device (8 tokens) sends at most 6 rows to each peer (8 / ep experts
    each; ep = 1 is data parallelism: the device's own buffer); the rest of the pairs for that
    peer, last tokens first, are dropped."""
    cfg = MoEConfig(num_experts=8, intermediate=12, dispatch="dropless", gemm="ragged_dot",
                    pair_budget=8.0, ep_budget=0.75, fallback_k=2)
    mesh = make_mesh(MeshConfig(data=data, expert=ep))
    local = 8 // ep
    params = layer_params(7)
    x = jax.random.normal(jax.random.key(8), (64, 16))
    r = jax.random.normal(jax.random.key(9), (64, 16))
    tok = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert", "fsdp")))
    x = jax.device_put(x, tok)
    taps = MoETaps(jnp.zeros((8 * ep * send_rows(8, cfg, ep), 16)), jnp.zeros((64, 16)))

    def run(params, x, taps):  # the EP layer: output, gradients, S; mask and weights for the check
        def loss(params, x, taps):
            out, rec = moe_layer(params, x, cfg, taps)
            return jnp.sum(out * r), (out, rec)
        (_, (out, rec)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, taps)
        s = layer_surprise(output_grad_surprise, rec, grads[2])
        return out, grads[:2], s, rec.dispatch.kept_NxE, rec.router.mask, rec.router.weights

    with activation_rules(mesh):  # what the sharded step sets: moe_layer goes expert-parallel
        out, grads, s, kept_ep, mask, w = jax.device_get(jax.jit(run)(params, x, taps))
    kept = np.zeros_like(mask)
    for dev in range(8):
        for peer in range(ep):
            pairs = [(t, x_) for t in range(dev * 8, dev * 8 + 8)
                     for x_ in range(local * peer, local * peer + local) if mask[t, x_]]
            for t, x_ in pairs[:6]:
                kept[t, x_] = True
    assert (mask & ~kept).any()
    np.testing.assert_array_equal(kept_ep, kept)

    @jax.jit
    def dense_ref(params, x):  # every expert on every token, dropped pairs' weights set to 0
        def f(params, x):
            router = route(params, x, cfg)
            return combine(router.weights * kept, expert_outputs(params["experts"], x).astype(jnp.float32))
        out, pull = jax.vjp(f, params, x)
        return out, pull(r)

    out_ref, grads_ref = dense_ref(params, jax.device_get(x))
    assert rel_err(out, out_ref) < 1e-5
    assert rel_err(grads, grads_ref) < 1e-5
    s_ref = np.where(kept, w, 0) * np.linalg.norm(np.asarray(r), axis=1)[:, None]  # S = ||w r_t||
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-7)


def test_send_rows_and_config():
    topk = MoEConfig(num_experts=8, router="topk", top_k=3)
    assert send_rows(10, topk, 2) == 30                  # top_k per token: never overflows
    assert send_rows(10, MoEConfig(num_experts=8), 2) == 40   # fallback_k 4 = E/ep: all pairs fit
    assert send_rows(10, MoEConfig(num_experts=8), 8) == 10   # capped at n * E/ep
    assert send_rows(10, MoEConfig(num_experts=8, ep_budget=0.25), 2) == 3
    for bad in (0.0, 9.0, "1"):
        with pytest.raises(ConfigError, match="model.moe.ep_budget"):
            MoEConfig(num_experts=8, ep_budget=bad)
    Config(model=ModelConfig(moe=MoEConfig(dispatch="dropless")), mesh=MeshConfig(expert=2))


@needs_devices(8)
def test_surprise_pullback_stays_cheap_under_expert_parallelism():
    """As tests/test_bench.py on one device: the tap-only pullback adds one matmul (the LM
    head's input gradient) to the forward: no parameter gradient, no expert backward, nothing
    below the MoE layer, though the layer runs through shard_map and all_to_all."""
    from helpers import random_batch, tiny_config
    from test_bench import dot_shapes

    from onn_jax.nn.transformer import init_params
    cfg = tiny_config(num_layers=1, dispatch="dropless", gemm="ragged_dot")
    params = init_params(cfg, jax.random.key(0))
    batch = random_batch(1, batch=8, length=7)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    params = jax.device_put(params, param_shardings(params, mesh))

    def loss(p, taps):
        logits, records = Transformer(cfg).apply({"params": p}, batch["inputs"], taps)
        assert type(records[0].dispatch).__name__ == "EPRows"   # the expert-parallel path ran
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]

    with activation_rules(mesh):
        taps = step_taps(cfg, 8, 7)
        forward = dot_shapes(loss, params, taps)
        surprise = dot_shapes(jax.grad(loss, argnums=1), params, taps)
    assert len(forward) > 0 and len(surprise) == len(forward) + 1, (forward, surprise)
