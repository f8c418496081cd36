"""onn-bench on CPU (tiny size, JSON lines), its FLOP formula, and the cheap Surprise backward
checked in the compiled HLO."""
import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest
from helpers import random_batch, tiny_config

from bench.bench import main
from bench.measure import dropless_fields
from bench.modes import force_thresholds, mode_config
from onn_jax.config import ModelConfig, MoEConfig
from onn_jax.core.losses import next_token_loss
from onn_jax.nn.transformer import Transformer, init_params
from onn_jax.training.flops import train_flops_per_token
from onn_jax.training.step import compute_grads, step_taps


def test_flop_formula_counts_each_matmul():
    cfg = ModelConfig(vocab_size=100, hidden=8, num_layers=2, num_heads=2,
                      moe=MoEConfig(num_experts=4, intermediate=6, expert_kind="swiglu"))
    t, k = 10, 1.5
    per_token_matmuls = [  # (in, out) of every forward matmul a token goes through, per layer
        (8, 8), (8, 8), (8, 8), (8, 8),        # q, k, v, out projections
        (8, 4),                                # router / prototypes
        *[(8, 6), (8, 6), (6, 8)] * 1,         # one expert: w1, w3, w2 (times k below)
    ]
    attn, router, expert = 4 * 2 * 8 * 8, 2 * 8 * 4, 2 * (8 * 6 + 8 * 6 + 6 * 8)
    assert sum(2 * a * b for a, b in per_token_matmuls) == attn + router + expert
    forward = 2 * (attn + router + k * expert) + 2 * 8 * 100 + 2 * (2 * 2 * t * 8)
    assert train_flops_per_token(cfg, t, k) == pytest.approx(3 * forward)
    dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router="dense"))
    assert train_flops_per_token(dense, t, k) == pytest.approx(3 * forward - 3 * 2 * router)


def test_modes_change_only_router_and_dispatch():
    cfg = tiny_config()
    assert mode_config(cfg, "smk", None, 1.25, None) == cfg
    plain = mode_config(cfg, "plain", 3, 1.25, None)
    assert (plain.moe.router, plain.moe.top_k) == ("topk", 3)
    sparse = mode_config(cfg, "sparse", 2, 1.25, "output_grad_closed")
    assert sparse.moe.dispatch == "sparse" and sparse.moe.surprise == "output_grad_closed"
    assert sparse.moe.capacity_factor == pytest.approx(1.25 * 2 / 4)  # k_ref = fallback E/2 = 4
    assert dataclasses.replace(sparse.moe, dispatch="dense", capacity_factor=None,
                               surprise="output_grad") == cfg.moe
    smk = mode_config(cfg, "smk", 2, 1.25, None, "dropless", "ragged_dot")
    assert (smk.moe.dispatch, smk.moe.pair_budget, smk.moe.gemm) == ("dropless", 2.5, "ragged_dot")
    plain = mode_config(cfg, "plain", 2, 1.25, None, "dropless")
    assert (plain.moe.pair_budget, plain.moe.top_k) == (None, 2)  # top_k rows per token
    assert dropless_fields(plain, 64) == {"pair_budget": 2.0, "pair_rows": 128, "gemm": "ragged_dot",
                                           "token_sum": "loop"}
    assert dropless_fields(cfg, 64)["pair_rows"] is None


@pytest.mark.slow
def test_force_thresholds_sets_avg_k():
    cfg = tiny_config(num_layers=2)
    batch = random_batch(0, batch=4, length=16)
    # jitted init and forward: op by op, the first calls of a process compile every op (~15 s)
    params = force_thresholds(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg,
                              batch["inputs"], 2)
    _, records = jax.jit(Transformer(cfg).apply)({"params": params}, batch["inputs"])
    for r in records:  # each expert passes a quarter (k/E) of the tokens before the fallback
        passed_E = np.asarray(r.router.pre > 0).mean(0)
        np.testing.assert_allclose(passed_E, 2 / 8, atol=1.5 / 64)


@pytest.mark.slow
def test_bench_prints_one_json_line_per_mode(capsys):
    rc = main(["--preset", "tiny", "--mode", "smk,sparse", "--steps", "20", "--warmup", "1",
               "--force-avg-k", "2", "--no-isolate"])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert rc == 0 and [r["mode"] for r in lines] == ["smk", "sparse"]
    for r in lines:
        assert r["config"] == "tiny" and r["component"] == "none" and r["device_kind"] and r["steps"] == 20
        assert 0 < r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / (r["step_ms"] / 1e3), rel=1e-3)
        assert 1.0 <= r["avg_k"] <= 4.0 and r["compile_s"] > 0 and r["host_callbacks"] == 0
        assert np.isfinite(r["main_loss"])
        assert r["pipelined_step_ms"] > 0 and r["attention"] == "xla"
        assert r["pipelined_tokens_per_s"] == pytest.approx(8 * 64 / (r["pipelined_step_ms"] / 1e3), rel=1e-2)
    assert lines[1]["dispatch"] == "sparse" and 0.0 <= lines[1]["dropped_frac"] < 1.0
    assert lines[0]["main_loss"] == pytest.approx(lines[1]["main_loss"], rel=1e-4)  # same model, same step


def test_every_component_changes_the_model():
    """Each phase-2 component of bench/components.py adds parameters to the tiny model (its
    gate, slots, memory, scales or tail clusters), so a row never times `none` twice."""
    from bench.components import COMPONENTS
    base = tiny_config()
    count = lambda m: len(jax.tree.leaves(jax.eval_shape(lambda: init_params(m, jax.random.key(0)))))
    n0 = count(base)
    for name, change in COMPONENTS.items():
        assert (count(change(base)) > n0) == (name != "none"), name


@pytest.mark.slow
def test_components_time_each_one_against_none(capsys):
    rc = main(["--preset", "tiny", "--mode", "plain", "--component", "none,heads_surprise", "--steps", "20",
               "--warmup", "1", "--no-isolate", "--loss-chunk", "16"])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert rc == 0 and [r["component"] for r in lines] == ["none", "heads_surprise"]
    assert [r["loss_chunk"] for r in lines] == [16, 16]
    assert all(r["saved_residual_gib"] > 0 for r in lines)
    assert all(np.isfinite(r["main_loss"]) and r["step_ms"] > 0 for r in lines)
    assert lines[1]["main_loss"] != pytest.approx(lines[0]["main_loss"], rel=1e-6)  # another model


def test_train_steps_times_a_trained_gate(capsys):
    # Real routing: the unforced smk model is trained on the builtin corpus before timing; its
    # loss falls below the uniform prediction's ln(262) (byte tokens) and the record says so.
    rc = main(["--preset", "tiny", "--mode", "smk", "--train-steps", "30", "--steps", "20",
               "--warmup", "1", "--no-isolate"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and rec["routing"] == "trained 30 steps on the builtin corpus"
    assert rec["trained_main_loss"] < math.log(262) - 0.1 and rec["main_loss"] < math.log(262) - 0.1
    assert 0 < rec["avg_k"] <= 4


@pytest.mark.parametrize("argv,flag", [(["--mode", "fast"], "--mode"), (["--steps", "5"], "--steps"),
                                       (["--force-avg-k", "E/0"], "--force-avg-k"),
                                       (["--force-avg-k", "9"], "--force-avg-k"),
                                       (["--component", "none,bogus"], "--component"),
                                       (["--train-steps", "5", "--force-avg-k", "2"], "--train-steps"),
                                       (["--loss-chunk", "-1"], "--loss-chunk")])
def test_bad_flags_name_the_flag(argv, flag, capsys):
    assert main(["--preset", "tiny", *argv]) == 2
    assert flag in capsys.readouterr().err


# --- Cheap Surprise: the Surprise backward holds no parameter gradient and stops at the lowest
# MoE layer. Token axes (B=3, T=7, N=21) differ from every model size, so a dot whose output has
# no token axis is a parameter gradient.

TOKEN_SIZES = {3, 7, 21, 23}


def dot_shapes(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} dot\(", text)]


def loss_and_inputs(num_layers, **moe_kwargs):
    cfg = tiny_config(num_layers=num_layers, **moe_kwargs)
    params = init_params(cfg, jax.random.key(0))
    batch = random_batch(1, batch=3, length=7)
    taps = step_taps(cfg, 3, 7)

    def loss(p, taps):
        logits, _ = Transformer(cfg).apply({"params": p}, batch["inputs"], taps)
        return next_token_loss(logits, batch["targets"], batch["loss_mask"])[0]
    return cfg, params, batch, taps, loss


@pytest.mark.slow
@pytest.mark.parametrize("moe_kwargs", [{}, {"dispatch": "dropless", "pair_budget": 23 / 21}],
                         ids=["dense", "dropless"])
def test_surprise_backward_has_no_parameter_gradient_and_stops_at_the_lowest_moe_layer(moe_kwargs):
    # Dropless: R = 23 pair rows, a token axis of its own (the Surprise taps live on it).
    cfg, params, batch, taps, loss = loss_and_inputs(1, **moe_kwargs)
    forward = dot_shapes(loss, params, taps)
    surprise = dot_shapes(jax.grad(loss, argnums=1), params, taps)
    full = dot_shapes(jax.grad(loss, argnums=0), params, taps)
    has_token_axis = lambda s: bool(TOKEN_SIZES & set(s))
    assert all(has_token_axis(s) for s in surprise)
    assert not all(has_token_axis(s) for s in full)  # the check can fail: weight grads lack them
    # One layer: the only backward matmul is the LM head's input gradient.
    assert len(surprise) == len(forward) + 1
    # In the unified step that matmul is shared with the total-gradient pullback: the smk step
    # has exactly the matmuls of the plain gradient of one loss.
    smk = dot_shapes(lambda p: compute_grads(p, batch, cfg)[0], params)
    assert len(smk) == len(full)


def test_kernel_variants_agree_with_their_reference(capsys):
    """bench.kernels on CPU: every combine / head variant computes its reference's function
    (the figures that chose onn_jax's implementations come from the same program)."""
    from bench.kernels import main as kernels_main
    assert kernels_main(["--size", "tiny", "--reps", "2", "--cases", "combine,head"]) == 0
    rows = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert {r["variant"] for r in rows} >= {"pair_gather", "shipped_segment_sum", "scatter_add", "full_logits"}
    for r in rows:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0, r
        if "out_err" in r:
            assert r["out_err"] < 1e-5 and r["grad_err"] < 1e-5, r


def test_scaling_check_compares_a_mesh_step_with_one_device(capsys):
    # bench/scaling.py's --check (the numerics row of the multi-GPU runs): the expert-parallel
    # dropless step on 2 devices equals the one-device step (float32 on CPU: rounding only), and
    # the forced thresholds (forced once, kept on the host) survive the donated timed steps.
    from bench.scaling import main as scaling_main
    scaling_main(["--size", "smoke", "--layouts", "1x2", "--mode", "smk", "--dispatch", "dropless",
                  "--pair-budget", "4", "--force-avg-k", "E/4", "--steps", "2", "--warmup", "1",
                  "--per-device-batch", "2", "--seq", "16", "--check"])
    recs = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [r["layout"] for r in recs] == ["1x2"] and not any("error" in r for r in recs), recs
    for r in recs:
        assert r["check_loss_rel_err"] < 1e-5 and r["check_params_rel_err"] < 1e-5
        assert 1.0 < r["moe/avg_k"] < 4.0  # forced to about E/4 = 2 (the fallback would be E/2 = 4)
