"""Small shared builders for the tests: tiny configs, random batches, independent references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from onn_jax.config import ModelConfig, MoEConfig


def tiny_config(num_layers: int = 2, router: str = "surprise", **moe_kwargs) -> ModelConfig:
    moe = MoEConfig(num_experts=8, intermediate=16, router=router, **moe_kwargs)
    return ModelConfig(vocab_size=40, hidden=16, num_layers=num_layers, num_heads=2, max_len=32, moe=moe)


def random_batch(seed: int, batch: int = 2, length: int = 8, vocab: int = 40, mask_prompt: bool = True):
    """A batch whose first positions are masked like a chat prompt."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
    mask = np.ones((batch, length), np.float32)
    if mask_prompt:
        mask[:, :3] = 0.0
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray(mask)}


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over a pytree (0 when both are 0)."""
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    return num / max(den, 1e-30)


def needs_devices(n: int):
    """Marks a test that builds an n-device mesh: where fewer devices exist (one GPU) it skips with
    the reason instead of failing with a mesh ConfigError (the CPU suite forces 8 devices)."""
    import pytest
    have = jax.device_count()
    return pytest.mark.skipif(have < n, reason=f"needs {n} devices for its mesh; this machine has {have}")
