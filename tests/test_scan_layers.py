"""model.scan_layers: the blocks as one nn.scan over stacked parameters give the unrolled
model's step (float32): loss, every layer's S, gate losses, gradients and updated parameters,
compared after mapping the stacked tree to the per-layer one (onn_jax.layer_stack)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, rel_err, tiny_config
from onn_jax.config import Config, ConfigError, ModelConfig, OptimConfig, from_dict
from onn_jax.layer_stack import layer_params, stack_layers, to_layout, unstack_layers
from onn_jax.losses import next_token_loss
from onn_jax.model import Transformer, init_params
from onn_jax.moe import layer_surprise
from onn_jax.step import make_optimizer, init_state, step_taps, train_step
from onn_jax.surprise import get_surprise_fn


def scanned(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=True, **kw)


def surprises(cfg, params, batch):
    """Every layer's S from the gradient with respect to the zero taps (an independent path)."""
    taps = step_taps(cfg, *batch["inputs"].shape)

    def loss(taps):
        logits, records = Transformer(cfg).apply({"params": params}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0], records
    d_taps, records = jax.grad(loss, has_aux=True)(taps)
    fn = get_surprise_fn(cfg.moe.surprise)
    return [layer_surprise(fn, r, d) for r, d in zip(records, d_taps)]


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_step_equals_the_unrolled_step(remat):
    cfg = tiny_config(num_layers=3)
    scfg = scanned(cfg, remat=remat)
    tx = make_optimizer(OptimConfig())
    state = init_state(cfg, tx, jax.random.key(0))
    sstate = init_state(scfg, tx, jax.random.key(0))
    assert set(sstate.params) == {"embed", "lm_head", "blocks"}
    assert sstate.params["blocks"]["moe"]["experts"]["w1"].shape == (3, 8, 16, 16)
    assert rel_err(unstack_layers(sstate.params), state.params) == 0.0  # same init, stacked
    batch = random_batch(0, batch=2, length=8)
    for s_un, s_sc in zip(surprises(cfg, state.params, batch), surprises(scfg, sstate.params, batch)):
        assert rel_err(s_sc, s_un) < 1e-6
    step = jax.jit(lambda st, c: train_step(st, batch, c, tx), static_argnums=1)
    new, m = step(state, cfg)
    snew, sm = step(sstate, scfg)
    for key, v in m.items():
        assert np.allclose(sm[key], v, rtol=1e-5, atol=1e-7), key
    assert sm["moe/expert_load"].shape == (3, 8)  # per-layer metrics stay per layer
    assert rel_err(unstack_layers(snew.params), new.params) < 1e-5
    counts = snew.opt_state[-1].counts["blocks"]["moe"]["experts"]["w1"]
    assert counts.shape == (3, 8)  # one AdamW counter per (layer, expert)
    np.testing.assert_array_equal(counts, np.stack([new.opt_state[-1].counts[f"block_{i}"]["moe"]["experts"]["w1"]
                                                    for i in range(3)]))
