"""The dense head fused with its cross entropy over chunks of positions (model.output.loss_chunk,
onn_jax/core/head_loss.py) against the assembled logits [B, T, V]: values, gradients, both
pullbacks of the Surprise step, accumulation shares, eval, 8 devices (and no reduction across
devices inside the scan), config errors."""
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onn_jax.config import ConfigError, MeshConfig, ModelConfig, MoEConfig, OptimConfig, OutputConfig
from onn_jax.core.head_loss import chunked_head_loss, head_logits
from onn_jax.core.losses import next_token_loss
from onn_jax.nn.transformer import init_params
from onn_jax.parallel.mesh import make_mesh
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import make_sharded_train_step, shard_batch, sharded_init
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads, make_train_step
from tests.helpers import needs_devices, random_batch, rel_err
from train.run.evaluate import eval_forward

B, T, C, V = 4, 10, 16, 37


def head_inputs(seed=0, all_masked=False):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, T, C))
    kernel = 0.3 * jax.random.normal(k[1], (C, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = jnp.zeros((B, T)) if all_masked else (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.int32)
    return h, kernel, targets, mask


def assembled(h, kernel, targets, mask, dtype):
    """The reference: logits [B, T, V] as the Dense head makes them, then next_token_loss."""
    z = head_logits(h, kernel, dtype)
    loss, acc, count = next_token_loss(z, targets, mask)
    return loss, (acc, count, optax.softmax_cross_entropy_with_integer_labels(z, targets))


def fused(h, kernel, targets, mask, dtype, chunk, shards):
    loss, acc, count, ce = chunked_head_loss(h, kernel, targets, mask, chunk, dtype, shards)
    return loss, (acc, count, ce)


@pytest.mark.parametrize("chunk, shards", [(1, 1), (3, 2), (10, 4), (64, 1)])  # 3 does not divide T; 64 > T
def test_values_and_gradients_equal_the_assembled_logits(chunk, shards):
    h, kernel, targets, mask = head_inputs()
    grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), static_argnums=(4, 5, 6))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 3e-3)):
        (want, want_aux), want_g = grad(lambda *a: assembled(*a[:5]))(h, kernel, targets, mask, dtype, 0, 0)
        (got, got_aux), got_g = grad(fused)(h, kernel, targets, mask, dtype, chunk, shards)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        chex.assert_trees_all_close(got_aux, want_aux, rtol=1e-6, atol=1e-6)
        assert rel_err(got_g[0], want_g[0]) < 1e-6  # dh: the same bfloat16 GEMM per row
        assert rel_err(got_g[1], want_g[1]) < tol   # dW: summed in float32 over chunks


def test_no_counted_label_is_zero_loss_and_zero_gradient():
    h, kernel, targets, mask = head_inputs(all_masked=True)
    (loss, (acc, count, ce)), g = jax.value_and_grad(fused, (0, 1), has_aux=True)(
        h, kernel, targets, mask, jnp.float32, 4, 1)
    assert float(loss) == 0.0 and float(acc) == 0.0 and float(count) == 0.0 and ce.shape == (B, T)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_bad_arguments_raise():
    h, kernel, targets, mask = head_inputs()
    with pytest.raises(ValueError, match="chunk"):
        chunked_head_loss(h, kernel, targets, mask, 0)
    with pytest.raises(ValueError, match="batch_shards"):
        chunked_head_loss(h, kernel, targets, mask, 2, batch_shards=3)
    with pytest.raises(AssertionError, match="kernel_CxV"):
        chunked_head_loss(h, kernel.T, targets, mask, 2)


def model_cfg(loss_chunk=0, **moe):
    return ModelConfig(vocab_size=40, hidden=16, num_layers=1, num_heads=2, max_len=32,
                       moe=MoEConfig(num_experts=4, intermediate=8, **moe), output=OutputConfig(loss_chunk=loss_chunk))


@pytest.mark.parametrize("moe, dtype, tol", [
    (dict(dispatch="dropless"), "float32", 1e-6),  # Surprise: both pullbacks through the fused head
    (dict(router="topk"), "bfloat16", 1e-2),
])
def test_the_train_step_and_eval_equal_the_assembled_head(moe, dtype, tol):
    """compute_grads with loss_chunk = 5 against loss_chunk = 0, as a microbatch's share (the
    loss's cotangent, 0.25, scales the stored gradients), and eval_forward."""
    cfg = dataclasses.replace(model_cfg(**moe), dtype=dtype)
    chunked = dataclasses.replace(cfg, output=OutputConfig(loss_chunk=5))
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
    batch = random_batch(3, batch=2, length=12, vocab=40)
    grads = jax.jit(compute_grads, static_argnums=2, static_argnames="return_records")
    share = jnp.float32(0.25)
    (g0, m0, r0), (g1, m1, r1) = (grads(params, batch, c, main_share=share, gate_share=share,
                                        return_records=True) for c in (cfg, chunked))
    assert rel_err(g1, g0) < tol
    chex.assert_trees_all_close(m1, m0, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(r1, r0, rtol=1e-5, atol=1e-6)
    e0, e1 = (jax.jit(eval_forward, static_argnums=0)(c, params, batch) for c in (cfg, chunked))
    np.testing.assert_allclose(e1.main, e0.main, rtol=1e-6)


@needs_devices(8)
def test_eight_devices_equal_one_and_reduce_the_kernel_gradient_after_the_scan():
    cfg = model_cfg(loss_chunk=2)
    tx = make_optimizer(OptimConfig())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
    state0 = jax.jit(functools.partial(init_state, model_cfg(), tx))(jax.random.key(0))
    want, want_m = make_train_step(model_cfg(), tx, donate=False)(state0, batch)
    mesh = make_mesh(MeshConfig(data=8))
    state = sharded_init(cfg, tx, jax.random.key(0), mesh)
    step = make_sharded_train_step(cfg, tx, mesh, donate=False)
    sharded_batch = shard_batch(batch, mesh)
    got, got_m = step(state, sharded_batch)
    assert rel_err(got.params, want.params) < 1e-5
    np.testing.assert_allclose(got_m["train/main_loss"], want_m["train/main_loss"], rtol=1e-6)
    hlo = step.lower(state, sharded_batch).compile().as_text()
    loops = re.findall(r"body=(%[\w.\-]+)", hlo)
    assert loops, "the chunked head's scan is a while loop"
    for body in loops:
        text = re.search(re.escape(body) + r" .*?\n}\n", hlo, re.S).group(0)
        assert not re.search(r"all-reduce(-start)?\(", text), f"a reduction across devices inside {body}"


@pytest.mark.parametrize("output, message", [
    (dict(loss_chunk=-1), "must be an integer >= 0"),
    (dict(loss_chunk=True), "must be an integer >= 0"),
    (dict(loss_chunk=2.5), "must be an integer >= 0"),
    (dict(kind="adaptive", loss_chunk=4), "is for kind = dense"),
])
def test_config_errors_name_the_field(output, message):
    with pytest.raises(ConfigError, match=message) as e:
        OutputConfig(**output)
    assert e.value.field == "model.output.loss_chunk"


def test_the_memory_check_counts_one_chunk_of_logits():
    """onn-train's lower bound (onn_jax/training/memory.py) counts [B, T, V] float32 logits, or
    [B, loss_chunk, V] with the fused head: it must not refuse a run the fused head makes fit."""
    from onn_jax.config import Config, DataConfig
    from onn_jax.training.memory import step_bytes
    data = DataConfig(batch_size=4, seq_len=32)
    full, fused = (step_bytes(Config(model=model_cfg(loss_chunk=n), data=data))["model.vocab_size"]
                   for n in (0, 16))
    assert full - fused == 4.0 * 4 * (32 - 16) * model_cfg().vocab_size
