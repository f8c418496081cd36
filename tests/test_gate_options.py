"""The seam of the gate options (onn_jax.training.options): the faithful configuration enables
none; an option plugged into the registry changes the step exactly as its hooks say (a plug-in
copy of a built-in option gives the built-in's gradients and metrics bit for bit)."""
import chex
import jax
import jax.numpy as jnp
import pytest

from onn_jax.config import MoEConfig
from onn_jax.nn.transformer import init_params
from onn_jax.training.options import registry
from onn_jax.training.options.base import GateOption
from onn_jax.training.step import compute_grads
from tests.helpers import random_batch, tiny_config


def test_the_faithful_gate_enables_no_option():
    assert registry.enabled_options(MoEConfig()) == ()
    assert registry.enabled_options(MoEConfig(router="dense")) == ()


def test_each_option_is_enabled_by_its_own_field():
    fields = {"adaptive_experts": dict(adaptive_experts=True), "gate_tokens": dict(gate_tokens="unmasked"),
              "gate_tie_break": dict(gate_tie_break="random"), "w_budget": dict(w_budget=0.5),
              "aux_free_rate": dict(router="topk", aux_free_rate=0.01)}
    assert sorted(opt.name for opt in registry.OPTIONS) == sorted(fields)
    for name, kwargs in fields.items():
        assert [opt.name for opt in registry.enabled_options(MoEConfig(**kwargs))] == [name]


class LabelTokens(GateOption):
    """gate_tokens='unmasked' written as a plug-in: the gate loss over the trained labels only."""

    name = "label_tokens"

    def enabled(self, m):
        return True

    def shape_gate(self, ctx, gate):
        return gate._replace(tokens=ctx.loss_mask_N)


class ConstantTerm(GateOption):
    """An extra gate-loss term with no gradient: 0.5 * 3 per layer."""

    name = "constant"

    def enabled(self, m):
        return True

    def extra_losses(self, m, pre_NxE):
        return {"const": (0.5, jnp.asarray(3.0, jnp.float32))}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    return cfg, init_params(cfg, jax.random.key(0)), random_batch(0)


def test_a_plugged_in_option_equals_the_builtin_one(setup, monkeypatch):
    cfg, params, batch = setup
    want = jax.jit(lambda p: compute_grads(p, batch, tiny_config(gate_tokens="unmasked")))(params)
    monkeypatch.setattr(registry, "OPTIONS", registry.OPTIONS + (LabelTokens(),))
    got = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    faithful = registry.OPTIONS[:-1]
    monkeypatch.setattr(registry, "OPTIONS", faithful)
    plain = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    chex.assert_trees_all_equal(got, want)
    assert float(plain[1]["moe/gate_loss"]) != float(got[1]["moe/gate_loss"])  # the option did change it


def test_an_extra_term_adds_to_the_gate_loss_and_nothing_else(setup, monkeypatch):
    cfg, params, batch = setup
    grads0, m0 = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    monkeypatch.setattr(registry, "OPTIONS", registry.OPTIONS + (ConstantTerm(),))
    grads1, m1 = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    layers = cfg.num_layers
    assert float(m1["moe/gate_const"]) == 3.0 * layers
    chex.assert_trees_all_close(m1["moe/gate_loss"], m0["moe/gate_loss"] + 1.5 * layers, rtol=1e-6)
    chex.assert_trees_all_close(m1["train/total_loss"], m0["train/total_loss"] + 1.5 * layers, rtol=1e-6)
    chex.assert_trees_all_equal(grads1, grads0)
