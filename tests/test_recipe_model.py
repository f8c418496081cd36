"""model.remat: the step's values are unchanged (float32) and the parameter tree is the same."""
import jax
import pytest
from helpers import random_batch, rel_err, tiny_config

from onn_jax.config import OptimConfig
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.state import init_state
from onn_jax.training.step import compute_grads


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_leaves_the_step_unchanged(remat):
    import dataclasses
    cfg = tiny_config()
    rcfg = dataclasses.replace(cfg, remat=remat)
    params = init_state(cfg, make_optimizer(OptimConfig()), jax.random.key(0)).params
    rparams = init_state(rcfg, make_optimizer(OptimConfig()), jax.random.key(0)).params
    assert jax.tree.structure(params) == jax.tree.structure(rparams)
    assert rel_err(rparams, params) == 0.0
    batch = random_batch(0, batch=2, length=8)
    g, m = jax.jit(lambda p: compute_grads(p, batch, cfg))(params)
    rg, rm = jax.jit(lambda p: compute_grads(p, batch, rcfg))(params)
    assert rel_err(rg, g) < 1e-6
    for key in ("train/main_loss", "moe/gate_loss", "moe/surprise_mean"):
        assert abs(float(rm[key]) - float(m[key])) <= 1e-6 * max(1.0, abs(float(m[key]))), key
    hlo = jax.jit(lambda p: compute_grads(p, batch, rcfg)).lower(params).as_text()
    assert "remat" in hlo or "checkpoint" in hlo or "opt-barrier" in hlo or "optimization_barrier" in hlo


def test_recipe_bench_prints_one_json_line_per_variant(capsys):
    import json

    from bench.recipe import main
    assert main(["--preset", "tiny", "--layers", "1", "--remat", "block", "--accum", "1,2",
                 "--batch", "4", "--seq-len", "8"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["remat"], r["accum_steps"]) for r in rows] == [("block", 1), ("block", 2)]
    for r in rows:
        assert r["compile_s"] > 0 and r["temp_gib"] is not None and r["layers"] == 1
