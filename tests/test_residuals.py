"""What the backward keeps of a bfloat16 dropless step (jax.ad_checkpoint.print_saved_residuals):
no rounded copy of an expert weight, no GELU internals, no float32 copy of a [B, T, C] or
[N, C] activation (norms, the router's input), of the [R, C] row buffers only the experts'
outputs (the dispatched inputs are gathered again), and with model.output.loss_chunk no
[B, T, V] logits. Each of these cost gigabytes at gpu_olmoe (docs/BENCHMARKS.md); the values are pinned
elsewhere (test_dropless.py, test_head_loss.py, test_golden.py)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from onn_jax.config import ModelConfig, MoEConfig, OutputConfig
from onn_jax.nn.transformer import Transformer, init_params
from onn_jax.training.step import forward_loss, step_taps

B, T, C, E, I, V, K = 2, 8, 32, 4, 24, 48, 2
N, R = B * T, B * T * K  # top-2 of 4 experts, dropless: R = N * k pair rows


def saved(capsys, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, description) of every residual that is not an argument."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch = {"inputs": jnp.zeros((B, T), jnp.int32), "targets": jnp.zeros((B, T), jnp.int32),
             "loss_mask": jnp.ones((B, T), jnp.float32)}
    taps = step_taps(cfg, B, T)
    capsys.readouterr()
    print_saved_residuals(lambda p, t: forward_loss(cfg, Transformer(cfg), p, batch, t, None)[0], params, taps)
    out = []
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
        if m and "from the argument" not in m.group(3):
            out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d), m.group(3)))
    return out


def model(router: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden=C, num_layers=1, num_heads=2, max_len=T, dtype="bfloat16",
                       norm="rmsnorm", **kw, moe=MoEConfig(num_experts=E, intermediate=I, top_k=K, router=router,
                                                           dispatch="dropless", pair_budget=float(K)))


@pytest.mark.parametrize("router", ["topk", "surprise"])
def test_the_backward_keeps_no_copies_that_it_can_recompute(capsys, router):
    res = saved(capsys, model(router))
    shapes = [(d, s) for d, s, _ in res]
    assert not [r for r in res if r[1] in ((E, C, I), (E, I, C))], res  # weights: the parameters themselves
    assert [s for d, s in shapes if s == (R, I)] == [(R, I)] * 2, res   # h (the activation's input), act(h)
    assert [s for d, s in shapes if s == (R, C)] == [(R, C)], res       # y (for the routing weights' gradient)
    f32_activations = [r for r in res if r[0] == "f32" and r[1] in ((B, T, C), (N, C))]
    assert not f32_activations, f32_activations
    assert any(s == (B, T, V) for _, s in shapes)  # the assembled logits, without loss_chunk


def test_the_fused_head_keeps_no_logits(capsys):
    res = saved(capsys, model("topk", output=OutputConfig(loss_chunk=4)))
    assert not [r for r in res if r[1][-1:] == (V,) and len(r[1]) > 2], res
    cfg = model("topk")
    assert saved(capsys, dataclasses.replace(cfg, output=OutputConfig(loss_chunk=0))) == saved(capsys, cfg)
