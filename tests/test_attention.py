"""Training attention implementations: which one is in force, and cuDNN against the einsums."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err, tiny_config

from onn_jax.config import ConfigError
from onn_jax.nn.attention import attention_impl, cuda_backend
from onn_jax.nn.transformer import Transformer, init_params


def model_cfg(**kw):
    return dataclasses.replace(tiny_config(), **kw)


def f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def test_attention_impl_resolution():
    bf16 = model_cfg(dtype="bfloat16")
    assert attention_impl(model_cfg()) == "xla"
    assert attention_impl(dataclasses.replace(bf16, attention="auto")) == ("cudnn" if cuda_backend() else "xla")
    assert attention_impl(model_cfg(attention="auto")) == "xla"  # float32: cuDNN flash needs bf16
    if not cuda_backend():
        with pytest.raises(ConfigError, match="model.attention: 'cudnn' needs a CUDA GPU"):
            attention_impl(dataclasses.replace(bf16, attention="cudnn"))


def test_cudnn_config_checks():
    with pytest.raises(ConfigError, match="model.attention: 'cudnn' .* needs dtype='bfloat16'"):
        model_cfg(attention="cudnn")
    with pytest.raises(ConfigError, match="multiple of 8 and <= 128, got 256"):
        model_cfg(dtype="bfloat16", attention="cudnn", hidden=512, num_heads=2)


@pytest.mark.skipif(not cuda_backend(), reason="cuDNN attention needs a CUDA GPU")
def test_cudnn_attention_equals_the_einsums_in_bf16():
    """Logits and every parameter gradient of a bf16 model: cuDNN flash attention against the
    explicit einsums, to bf16 rounding. The FFN is dense: a top-any gate would turn rounding
    differences into different expert sets for tokens near a threshold."""
    base = dataclasses.replace(tiny_config(router="dense"), dtype="bfloat16", hidden=128, num_heads=2,
                               max_len=256)
    params = init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 256), 0, base.vocab_size)

    def loss(p, cfg):
        logits, _ = Transformer(cfg).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    outs = {}
    for impl in ("xla", "cudnn"):
        cfg = dataclasses.replace(base, attention=impl)
        (_, logits), grads = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg), has_aux=True))(params)
        outs[impl] = (logits, grads)
    errs = [rel_err(f32(outs["cudnn"][i]), f32(outs["xla"][i])) for i in (0, 1)]
    assert errs[0] < 2e-2 and errs[1] < 5e-2, errs
