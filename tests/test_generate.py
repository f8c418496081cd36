"""KV-cache decoding: cached logits == full forward, greedy == argmax of the full forward,
seeded sampling, top-p, EOS handling, padded batches, argument errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import ModelConfig, MoEConfig
from onn_jax.nn.attention import init_cache
from onn_jax.nn.generate import generate, generate_batch, sample_logits, top_p_filter
from onn_jax.nn.transformer import Transformer, init_params

MOE = MoEConfig(num_experts=4, intermediate=8)
CFGS = {
    "surprise_2layers": ModelConfig(vocab_size=64, hidden=16, num_heads=2, num_layers=2, max_len=32, moe=MOE),
    "topk_final_norm": ModelConfig(vocab_size=64, hidden=16, num_heads=2, max_len=32, final_norm=True,
                                   moe=MoEConfig(num_experts=4, intermediate=8, router="topk")),
    "dense_rmsnorm": ModelConfig(vocab_size=64, hidden=16, num_heads=2, max_len=32, norm="rmsnorm",
                                 moe=MoEConfig(num_experts=4, intermediate=8, router="dense")),
}
CFG = ModelConfig(vocab_size=64, hidden=16, num_heads=2, max_len=32, moe=MOE)
N = 12  # max_new_tokens everywhere: generate compiles once per (config, shapes, N)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=(0,))(CFG, jax.random.key(0))


def full_logits(params, cfg, tokens_BxT):
    return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, tokens_BxT)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CFGS))
def test_cached_logits_equal_full_forward(name):
    """Prefill 5 tokens, then a chunk of 3, then one token at a time: every position's logits
    equal the uncached forward's."""
    cfg = CFGS[name]
    p = jax.jit(init_params, static_argnums=(0,))(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    want = full_logits(p, cfg, tokens)
    model = Transformer(cfg)
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, positions_BxT=pos, cache=c))
    cache, got = init_cache(cfg, 2, 16), []
    for start, stop in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 12)]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        logits, records, cache = step(p, tokens[:, start:stop], pos, cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=2e-5, rtol=2e-5)
    assert cache.valid[:, :12].all() and not cache.valid[:, 12:].any()
    assert cache.layers[0].key.shape == (2, 16, cfg.num_heads, cfg.head_dim)


def test_padding_is_invisible(params):
    """A right-padded prompt row gives the same logits as the row alone, and later tokens
    written over the padding slots see them as real."""
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, CFG.vocab_size)
    want = full_logits(params, CFG, tokens)
    model = Transformer(CFG)
    padded = jnp.concatenate([tokens[:, :4], jnp.full((1, 3), 7)], axis=1)  # 4 real + 3 pads
    pos = jnp.arange(7)[None]
    logits, _, cache = jax.jit(model.apply)({"params": params}, padded, positions_BxT=pos,
                                            cache=init_cache(CFG, 1, 9), tokens_valid_BxT=pos < 4)
    np.testing.assert_allclose(logits[:, :4], want[:, :4], atol=2e-5, rtol=2e-5)
    step = jax.jit(lambda c, t, pos: model.apply({"params": params}, t, positions_BxT=pos, cache=c))
    for t in range(4, 9):
        logits, _, cache = step(cache, tokens[:, t:t + 1], jnp.array([[t]]))
        np.testing.assert_allclose(logits[:, 0], want[:, t], atol=2e-5, rtol=2e-5)


def naive_greedy(params, cfg, prompt, n, limit=None):
    """Argmax of the uncached forward over ids < limit (default all), one token at a time (a fixed
    buffer: the model is causal)."""
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, len(prompt) + n), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(fwd(params, jnp.asarray(buf))[0, len(seq) - 1][:limit])))
    return seq[len(prompt):]


@pytest.mark.slow
def test_greedy_equals_argmax_of_full_forward(params):
    prompts = [[1, 2, 3], [5, 9, 11, 13, 17, 19, 23]]
    out = generate_batch(params, CFG, prompts, max_new_tokens=N)
    for prompt, got in zip(prompts, out):
        assert got == naive_greedy(params, CFG, prompt, N)
    assert generate(params, CFG, prompts[1], max_new_tokens=N) == out[1]  # batch == alone
    # A tokenizer smaller than model.vocab_size: only its ids are generated (greedy = the argmax
    # over them), where the unrestricted greedy run does use ids beyond it.
    limit = 24
    assert max(max(row) for row in out) >= limit
    limited = generate_batch(params, CFG, prompts, max_new_tokens=N, vocab_limit=limit)
    for prompt, got in zip(prompts, limited):
        assert got == naive_greedy(params, CFG, prompt, N, limit) and max(got) < limit


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(params):
    prompt = [3, 1, 4, 1, 5]
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = generate(params, CFG, prompt, seed=1, **kw)
    assert a == generate(params, CFG, prompt, seed=1, **kw)
    assert a != generate(params, CFG, prompt, seed=2, **kw)
    greedy = generate(params, CFG, prompt, max_new_tokens=N)
    assert generate(params, CFG, prompt, seed=3, top_p=1e-6, **kw) == greedy


def test_eos_cuts_the_continuation(params):
    prompt = [2, 7, 1, 8]
    greedy = generate(params, CFG, prompt, max_new_tokens=N)
    assert generate(params, CFG, prompt, max_new_tokens=N, eos_id=greedy[0]) == []
    k = next(i for i in range(1, N) if greedy[i] not in greedy[:i])
    assert generate(params, CFG, prompt, max_new_tokens=N, eos_id=greedy[k]) == greedy[:k]


def test_top_p_filter_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.8) == [False, True, False, True]   # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0.8))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0, 0.625, 0, 0.375], atol=0.03)


def test_bad_arguments_are_clear(params):
    with pytest.raises(ValueError, match="exceeds model.max_len 32"):
        generate(params, CFG, list(range(30)), max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(params, CFG, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, [1], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, CFG, [1], temperature=-1.0)
    with pytest.raises(ValueError, match="token id 64 outside model.vocab_size 64"):
        generate(params, CFG, [1, 64])


def test_sparse_dispatch_generates_without_capacity_drops(params):
    """Generation lifts the capacity limit: sparse dispatch with a tight capacity_factor
    generates exactly what the dense layer (no drops) does."""
    import dataclasses

    from onn_jax.nn.generate import decode_config
    sparse = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, dispatch="sparse", capacity_factor=0.1))
    assert decode_config(sparse).moe.capacity_factor is None and decode_config(CFG) is CFG
    prompt = [4, 8, 15, 16, 23, 42]
    assert generate(params, sparse, prompt, max_new_tokens=N) == generate(params, CFG, prompt, max_new_tokens=N)
