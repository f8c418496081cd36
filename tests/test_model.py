"""Model: experts against a NumPy reference, causality, parameter layout, bf16 and routers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from onn_jax.core.experts import combine, expert_outputs
from onn_jax.nn.transformer import Transformer, init_params


def test_expert_outputs_match_a_per_expert_numpy_loop_with_exact_gelu():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    params = {"w1": rng.normal(size=(3, 4, 6)).astype(np.float32),
              "w2": rng.normal(size=(3, 6, 4)).astype(np.float32)}
    erf = np.vectorize(math.erf)
    y = np.stack([(0.5 * h * (1 + erf(h / math.sqrt(2)))) @ params["w2"][e]
                  for e, h in enumerate(x @ params["w1"][e] for e in range(3))], axis=1)
    np.testing.assert_allclose(expert_outputs(jax.tree.map(jnp.asarray, params), jnp.asarray(x)), y,
                               rtol=1e-5, atol=1e-5)
    w = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    np.testing.assert_allclose(combine(jnp.asarray(w), jnp.asarray(y)), np.einsum("ne,nec->nc", w, y),
                               rtol=1e-5, atol=1e-5)


def test_swiglu_experts():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    p = {k: rng.normal(size=s).astype(np.float32) for k, s in
         {"w1": (2, 4, 3), "w3": (2, 4, 3), "w2": (2, 3, 4)}.items()}
    silu = lambda h: h / (1 + np.exp(-h))
    y = np.stack([(silu(x @ p["w1"][e]) * (x @ p["w3"][e])) @ p["w2"][e] for e in range(2)], axis=1)
    np.testing.assert_allclose(expert_outputs(p, jnp.asarray(x), "swiglu"), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["surprise", "topk", "dense"])
def test_causality_logits_at_t_ignore_later_tokens(router):
    cfg = tiny_config(num_layers=2, router=router)
    params = init_params(cfg, jax.random.key(0))
    model = Transformer(cfg)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 12)), jnp.int32)
    logits, _ = model.apply({"params": params}, tokens)
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
        logits2, _ = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(logits2[:, : t + 1], logits[:, : t + 1])
        assert float(jnp.abs(logits2[:, t + 1:] - logits[:, t + 1:]).max()) > 0


def test_causality_by_gradients():
    """d logits[t] / d embedding(token s) is zero for every s > t."""
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.key(2))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size
    t = 4

    def out_at_t(emb):
        p = {**params, "embed": {"embedding": emb}}
        return jnp.sum(Transformer(cfg).apply({"params": p}, tokens)[0][0, t])

    g = jax.grad(out_at_t)(params["embed"]["embedding"])  # rows = token ids = positions here
    assert float(jnp.abs(g[t + 1:10]).max()) == 0.0
    assert float(jnp.abs(g[: t + 1]).max()) > 0.0


def test_parameter_layout_and_faithful_init():
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.key(3))
    moe = params["block_1"]["moe"]
    assert moe["experts"]["w1"].shape == (8, 16, 16) and moe["experts"]["w2"].shape == (8, 16, 16)
    assert moe["prototypes"].shape == (16, 8)
    np.testing.assert_array_equal(moe["thresholds"], 0.0)
    assert abs(float(jnp.std(params["embed"]["embedding"])) - 1.0) < 0.2  # N(0, 1) like nn.Embedding
    bound = 1 / math.sqrt(16)  # PyTorch Linear: U(+-1/sqrt(fan_in))
    assert float(jnp.abs(moe["experts"]["w1"]).max()) <= bound
    assert "bias" not in params["lm_head"] and "final_norm" not in params


def test_bfloat16_compute_keeps_float32_params_and_router():
    cfg = tiny_config(num_layers=1)
    cfg = cfg.__class__(**{**cfg.__dict__, "dtype": "bfloat16"})
    params = init_params(cfg, jax.random.key(4))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, records = Transformer(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and records[0].router.pre.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_layernorm_is_two_pass_accurate_on_shifted_tokens():
    """Rows with a large mean and unit spread: PyTorch-like LayerNorm stays accurate."""
    from onn_jax.nn.layers import Norm
    cfg = tiny_config(num_layers=1)
    x = 300.0 + jnp.asarray(np.random.default_rng(7).normal(size=(4, 16)), jnp.float32)
    norm = Norm(cfg)
    y = norm.apply(norm.init(jax.random.key(0), x), x)
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, atol=5e-4)
