"""Non-finite guard: a poisoned batch or poisoned params leave the state unchanged and are counted;
a finite step equals the unguarded step; the sharded guarded step equals the 1-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import MeshConfig, OptimConfig
from onn_jax.parallel.mesh import make_mesh
from onn_jax.training.guard import SKIPPED, all_finite, make_guarded_step
from onn_jax.training.optimizer import make_optimizer
from onn_jax.training.sharded import shard_batch, sharded_init
from onn_jax.training.state import init_state
from onn_jax.training.step import make_train_step
from tests.helpers import needs_devices, random_batch, tiny_config

CFG = tiny_config(num_layers=1)
TX = make_optimizer(OptimConfig())


def fresh_state():
    return init_state(CFG, TX, jax.random.key(0))


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def poisoned(batch):
    """loss_mask NaN -> main loss sum(ce * NaN) / max(sum NaN, 1) = NaN, and NaN gradients."""
    return dict(batch, loss_mask=jnp.full_like(batch["loss_mask"], jnp.nan))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_all_finite():
    assert bool(all_finite({"a": jnp.ones(3), "b": jnp.arange(3)}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
    assert not bool(all_finite([jnp.array([jnp.nan])]))


@pytest.mark.slow
def test_poisoned_batch_leaves_state_unchanged_then_training_continues():
    step = make_guarded_step(CFG, TX, donate=False)
    plain = make_train_step(CFG, TX, donate=False)
    s0 = fresh_state()
    before = host(s0)
    s1, m1 = step(s0, poisoned(random_batch(0)))
    assert int(m1[SKIPPED]) == 1 and not np.isfinite(float(m1["train/total_loss"]))
    assert int(s1.step) == 1  # the counter counts batches consumed
    assert_trees_equal(host(s1.params), before.params)
    assert_trees_equal(host(s1.opt_state), before.opt_state)  # AdamW's count did not advance
    # the next (good) step equals the unguarded step from the untouched state
    good = random_batch(1)
    s2, m2 = step(s1, good)
    ref, mref = plain(fresh_state(), good)
    assert int(m2[SKIPPED]) == 0 and int(s2.step) == 2
    np.testing.assert_allclose(float(m2["train/main_loss"]), float(mref["train/main_loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(s2.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(s2.params)[0], jax.tree.leaves(before.params)[0])


@pytest.mark.slow
def test_poisoned_params_are_never_updated():
    step = make_guarded_step(CFG, TX, donate=False)
    s = fresh_state()
    emb = s.params["embed"]["embedding"].at[3, 0].set(jnp.inf)
    s = s.replace(params={**s.params, "embed": {**s.params["embed"], "embedding": emb}})
    before = host(s)
    for i in range(2):
        s, m = step(s, random_batch(i))
        assert int(m[SKIPPED]) == 1
    assert_trees_equal(host(s.params), before.params)


@pytest.mark.slow
def test_finite_step_is_the_unguarded_step_and_donates():
    step = make_guarded_step(CFG, TX)  # donating
    s = fresh_state()
    s, m = step(s, random_batch(2))
    ref, mref = make_train_step(CFG, TX)(fresh_state(), random_batch(2))
    assert int(m[SKIPPED]) == 0
    for k in mref:
        np.testing.assert_allclose(np.asarray(m[k]), np.asarray(mref[k]), rtol=1e-6, err_msg=k)
    old = fresh_state()
    step(old, random_batch(3))
    assert jax.tree.leaves(old.params)[0].is_deleted()  # the old state was donated


@needs_devices(8)
@pytest.mark.slow
def test_sharded_guarded_step_matches_one_device():
    """8 forced CPU devices, data x expert = 2 x 4: the same skips and the same update."""
    mesh = make_mesh(MeshConfig(data=2, expert=4), jax.devices()[:8])
    step8 = make_guarded_step(CFG, TX, mesh)
    step1 = make_guarded_step(CFG, TX)
    s8, s1 = sharded_init(CFG, TX, jax.random.key(0), mesh), fresh_state()
    for batch in (poisoned(random_batch(4, batch=8)), random_batch(5, batch=8)):
        s8, m8 = step8(s8, shard_batch(dict(batch), mesh))
        s1, m1 = step1(s1, batch)
        assert int(m8[SKIPPED]) == int(m1[SKIPPED])
    assert int(m8[SKIPPED]) == 0
    for x, y in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- through onn-train

TINY = ["--config", "configs/tiny.py", "--config.train.steps=8", "--config.checkpoint.every=4",
        "--config.train.eval_every=0", "--config.train.log_every=2", "--config.train.sample_tokens=2",
        "--config.train.plots=false"]


def poison_steps(monkeypatch, steps):
    """Makes the loop's batches of the given (1-based) steps NaN-poisoned."""
    import train.run.loop
    original, seen = train.run.loop.Run._batch, []

    def batch(self):
        b = original(self)
        seen.append(len(seen) + 1)
        return poisoned(b) if seen[-1] in steps else b

    monkeypatch.setattr(train.run.loop.Run, "_batch", batch)


@pytest.mark.slow
def test_training_skips_poisoned_batches_and_continues(monkeypatch, tmp_path, capsys):
    from onn_jax.io.checkpointer import Checkpointer
    from train.common.metrics_file import read_metrics
    from train.main import main
    poison_steps(monkeypatch, {3, 4, 7})
    assert main([*TINY, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 3: loss or gradients not finite; update skipped (1 in a row, 1 in all)" in out
    assert "step 4: loss or gradients not finite; update skipped (2 in a row, 2 in all)" in out
    assert "skipped steps (non-finite loss or gradients): 3" in out
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert [rows[s]["train/skipped_steps"] for s in (2, 4, 6, 8)] == [0, 2, 2, 3]
    assert rows[4]["train/skipped"] == 1.0 and rows[8]["train/skipped"] == 0.5
    assert rows[8]["train/main_loss"] is not None  # the mean over the step that was not skipped
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.restore_meta(8)["guard"] == {"skipped_steps": 3, "skipped_in_a_row": 0}
        params = ckpt.restore_params(step=8)[0]
    assert bool(all_finite(params))


@pytest.mark.slow
def test_too_many_skips_in_a_row_stop_with_a_checkpoint(monkeypatch, tmp_path, capsys):
    from onn_jax.io.checkpointer import Checkpointer
    from train.main import main
    poison_steps(monkeypatch, {3, 4, 5, 6, 7, 8})
    assert main([*TINY, "--workdir", str(tmp_path), "--config.train.max_skipped_in_a_row=3",
                 "--config.checkpoint.every=2"]) == 3
    err = capsys.readouterr().err
    assert "onn-train: stopped: 4 steps in a row (up to step 6) had a non-finite loss" in err
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps()[-1] == 6
        last, good = ckpt.restore_params(step=6)[0], ckpt.restore_params(step=4)[0]  # keep=2
        assert ckpt.restore_meta(6)["guard"]["skipped_in_a_row"] == 4  # 3, 4, 5 and 6
    assert_trees_equal(host(last), host(good))  # steps 5 and 6 changed nothing
    assert not (tmp_path / ".onn-train.lock").exists()


def test_sample_clamps_new_tokens_to_max_len(monkeypatch):
    """A chat prompt plus train.sample_tokens beyond model.max_len generates what fits."""
    import importlib
    gen = importlib.import_module("onn_jax.nn.generate")  # the module (the package re-exports a function)
    from onn_jax.config import Config, ModelConfig, MoEConfig
    from onn_jax.data.tokenizer import ByteTokenizer, encode_chat
    from onn_jax.nn.transformer import init_params
    from train.run.sample import sample
    model = ModelConfig(vocab_size=262, hidden=16, num_heads=2, max_len=24,
                        moe=MoEConfig(num_experts=2, intermediate=8))
    cfg = Config(model=model, data=Config().data.__class__(seq_len=16))
    params = init_params(model, jax.random.key(0))
    tok, prompt = ByteTokenizer(), "What is 2 + 3?"
    n_prompt = len(encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0])
    asked, real = [], gen.generate
    monkeypatch.setattr(gen, "generate",
                        lambda *a, **kw: asked.append(kw["max_new_tokens"]) or real(*a, **kw))
    assert isinstance(sample(params, cfg, tok, prompt, max_new_tokens=100), str)
    assert asked == [model.max_len - n_prompt]
    assert "does not fit" in sample(params, cfg, tok, "x" * 30, max_new_tokens=5)
