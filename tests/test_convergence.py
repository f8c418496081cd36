"""A tiny model learns a deterministic toy sequence task: loss falls >= 50% in 200 steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import ModelConfig, MoEConfig, OptimConfig
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step


def counting_batches(vocab=16, batch=8, length=16, seed=0):
    """Sequences (a, a+s, a+2s, ...) mod vocab with s in {1, 2, 3}: next token is predictable
    from the previous two, so the task needs attention as well as the FFN."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, vocab, size=(batch, 1))
        stride = rng.integers(1, 4, size=(batch, 1))
        seq = (start + stride * np.arange(length + 1)) % vocab
        mask = np.ones((batch, length), np.float32)
        mask[:, 0] = 0.0  # the stride is unknown after one token
        yield {"inputs": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32),
               "loss_mask": jnp.asarray(mask)}


@pytest.mark.slow
@pytest.mark.parametrize("router", ["surprise", "topk"])
def test_loss_falls_by_half_in_200_steps(router):
    cfg = ModelConfig(vocab_size=16, hidden=32, num_layers=2, num_heads=4, max_len=32,
                      moe=MoEConfig(num_experts=8, intermediate=32, router=router))
    tx = make_optimizer(OptimConfig())
    state = init_state(cfg, tx, jax.random.key(0))
    step = make_train_step(cfg, tx)
    data = counting_batches()
    losses = []
    for _ in range(200):
        state, metrics = step(state, next(data))
        losses.append(float(metrics["train/main_loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert np.isfinite(losses).all()
    assert last <= 0.5 * first, (first, last)
