"""Checkpoints: exact resume, save cadence and retention, shape errors, resharding, export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from onn_jax.config import ModelConfig, MoEConfig, OptimConfig, to_dict  # noqa: E402
from onn_jax.io.checkpoint_meta import make_meta, rng_from_json, rng_to_json
from onn_jax.io.checkpointer import Checkpointer
from onn_jax.io.errors import CheckpointError
from onn_jax.io.params_export import export_params, load_params
from onn_jax.io.restore_targets import abstract_like
from onn_jax.training.optimizer import make_optimizer  # noqa: E402
from onn_jax.training.state import init_state  # noqa: E402
from onn_jax.training.step import make_train_step  # noqa: E402

CFG = ModelConfig(hidden=16, num_heads=2, max_len=16, moe=MoEConfig(num_experts=4, intermediate=8))
TX = make_optimizer(OptimConfig())


def batch(seed, b=2, t=8):
    toks = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, CFG.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": jnp.ones((b, t), jnp.float32)}


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def step_fn():
    return make_train_step(CFG, TX, donate=False)


@pytest.fixture(scope="module")
def state0():
    # Committed to device 0 like restored arrays, so the jitted step is not compiled twice.
    state = jax.jit(init_state, static_argnums=(0, 1))(CFG, TX, jax.random.key(0))
    return jax.device_put(state, jax.local_devices()[0])


@pytest.mark.slow
def test_resume_continues_bit_identically(tmp_path, step_fn, state0):
    state = state0
    state, _ = step_fn(state, batch(1))
    rng = jax.random.key(7)
    meta = make_meta(config={"model": to_dict(CFG)}, data_state={"epoch": 0, "index": 3}, rng=rng,
                     tokenizer={"kind": "bytes", "vocab_size": 256})
    with Checkpointer(tmp_path / "ck", save_every=1) as ck:
        assert ck.save(1, state, meta)
    uninterrupted, m_ref = step_fn(state, batch(2))

    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() == 1
    restored, meta2 = ck.restore(abstract_like(init_state, CFG, TX, jax.random.key(123)))
    assert leaves_equal(restored, state)
    assert meta2["data"] == {"epoch": 0, "index": 3}
    assert meta2["config"]["model"]["moe"]["num_experts"] == 4
    assert np.array_equal(jax.random.key_data(rng_from_json(meta2["rng"])), jax.random.key_data(rng))
    resumed, m_res = step_fn(restored, batch(2))
    assert leaves_equal(resumed, uninterrupted)
    assert all(np.array_equal(m_ref[k], m_res[k]) for k in m_ref)
    ck.close()


def test_save_every_keep_last_and_force(tmp_path, state0):
    state = state0
    with Checkpointer(tmp_path, save_every=2, keep=2) as ck:
        saved = [s for s in range(1, 8) if ck.save(s, state, {"s": s})]
        assert saved == [2, 4, 6]
        assert ck.save(7, state, {"s": 7}, force=True)
        assert not ck.save(7, state, {"s": 7}, force=True)  # same step twice: no-op
        ck.wait()
        assert ck.all_steps() == [6, 7]
        assert ck.restore_meta() == {"s": 7}
        assert ck.restore_meta(6) == {"s": 6}


def test_shape_mismatch_names_path_and_shapes(tmp_path, state0):
    state = state0
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, {}, force=True)
    other = ModelConfig(hidden=16, num_heads=2, max_len=16, moe=MoEConfig(num_experts=8, intermediate=8))
    ck = Checkpointer(tmp_path, read_only=True)
    with pytest.raises(CheckpointError, match=r"params/block_0/moe/experts/w1 has shape \(4, 16, 8\) "
                                              r"in the checkpoint but \(8, 16, 8\)"):
        ck.restore(abstract_like(init_state, other, TX, jax.random.key(0)))
    from onn_jax.nn.transformer import init_params
    with pytest.raises(CheckpointError, match=r"moe/experts/w1 has shape \(4, 16, 8\)"):
        ck.restore_params(abstract_like(init_params, other, jax.random.key(0)))
    deeper = ModelConfig(hidden=16, num_heads=2, max_len=16, num_layers=2,
                         moe=MoEConfig(num_experts=4, intermediate=8))
    with pytest.raises(CheckpointError, match=r"block_1/.* is in the model but not in the checkpoint"):
        ck.restore_params(abstract_like(init_params, deeper, jax.random.key(0)))


def test_missing_checkpoints_are_clear_errors(tmp_path, state0):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "nope", read_only=True)
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ck.restore_meta()
    state = state0
    with Checkpointer(tmp_path / "one") as ck:
        ck.save(5, state, {}, force=True)
        ck.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 4 .* have \[5\]"):
            ck.restore_meta(4)
    with pytest.raises(CheckpointError, match="save_every"):
        Checkpointer(tmp_path / "x", save_every=0)


def test_restore_onto_another_mesh(tmp_path, state0):
    """Saved from one device; restored sharded over 8 (embedding rows split, rest replicated)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces them on CPU)")
    state = state0
    with Checkpointer(tmp_path) as ck:
        ck.save(1, state, {}, force=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    abstract = jax.eval_shape(lambda: init_state(CFG, TX, jax.random.key(0)))
    shard = jax.tree_util.tree_map_with_path(
        lambda path, a: NS(mesh, P("data") if "embedding" in jax.tree_util.keystr(path) and a.ndim else P()),
        abstract)  # a.ndim: the optimizer's per-tensor step counters are scalars
    restored, _ = Checkpointer(tmp_path).restore(abstract_like(init_state, CFG, TX, jax.random.key(0),
                                                               shardings=shard))
    emb = restored.params["embed"]["embedding"]
    assert emb.sharding.is_equivalent_to(NS(mesh, P("data")), emb.ndim)
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (32, 16)
    assert leaves_equal(jax.device_get(restored), jax.device_get(state))


def test_export_then_load_params(tmp_path, state0):
    state = state0
    meta = make_meta(config={"model": to_dict(CFG)}, tokenizer={"kind": "bytes"})
    with Checkpointer(tmp_path / "ck", save_every=1) as ck:
        ck.save(1, state, meta)
        ck.save(2, jax.tree.map(lambda x: x + 1, state), meta)
    assert export_params(tmp_path / "ck", tmp_path / "out") == 2
    params, emeta = load_params(tmp_path / "out")
    assert leaves_equal(params, jax.tree.map(lambda x: x + 1, state.params))
    assert emeta == {"step": 2, "config": {"model": to_dict(CFG)}, "tokenizer": {"kind": "bytes"}}
    assert sorted(os.listdir(tmp_path / "out")) == ["export.json", "params"]
    json.loads((tmp_path / "out" / "export.json").read_text())
    assert export_params(tmp_path / "ck", tmp_path / "out1", step=1) == 1
    assert leaves_equal(load_params(tmp_path / "out1")[0], state.params)
    with pytest.raises(CheckpointError, match="already holds an export"):
        export_params(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out" / "export.json.tmp").exists()  # written atomically, tmp renamed away
    with pytest.raises(CheckpointError, match="not a params export"):
        load_params(tmp_path / "ck")
    from onn_jax.nn.transformer import init_params
    small = ModelConfig(hidden=8, num_heads=2, max_len=16, moe=MoEConfig(num_experts=4, intermediate=8))
    with pytest.raises(CheckpointError, match=r"block_0/attn/key/kernel has shape \(16, 2, 8\) in the checkpoint "
                                              r"but \(8, 2, 4\)"):
        load_params(tmp_path / "out", abstract_like(init_params, small, jax.random.key(0)))


def test_export_refuses_the_remains_of_an_interrupted_export(tmp_path, state0, monkeypatch):
    """A crash after params/ but before export.json: neither tool takes the folder; export names it."""
    import onn_jax.io.params_export as params_export_mod
    with Checkpointer(tmp_path / "ck", save_every=1) as ck:
        ck.save(1, state0, make_meta(config={"model": to_dict(CFG)}))

    real_replace = os.replace

    def crash(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith("export.json"):
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(params_export_mod.os, "replace", crash)  # dies committing export.json
    with pytest.raises(OSError, match="disk full"):
        export_params(tmp_path / "ck", tmp_path / "out")
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "params").is_dir() and not (out / "export.json").exists()  # no half-written meta
    with pytest.raises(CheckpointError, match="not a params export"):
        load_params(out)
    with pytest.raises(CheckpointError, match=rf"{out} holds an incomplete export \(found params; "
                                              rf".*delete {out} and export again"):
        export_params(tmp_path / "ck", out)
    (tmp_path / "tmp_only" / "params.orbax-checkpoint-tmp-1").mkdir(parents=True)  # died inside the save
    with pytest.raises(CheckpointError, match="incomplete export"):
        export_params(tmp_path / "ck", tmp_path / "tmp_only")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        export_params(tmp_path / "ck", tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    assert export_params(tmp_path / "ck", tmp_path / "empty") == 1  # an empty existing folder is fine
    assert load_params(tmp_path / "empty")[1]["step"] == 1


def test_generate_reads_the_model_config_of_the_checkpoint_step(tmp_path, state0):
    """onn-generate --step K: the model config stored with step K, not the workdir's current
    config.json (a later run may have changed it); config.json only for a meta without one."""
    from onn_jax.config import Config
    from train.common.trained_model import ModelLoadError, load_model
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(to_dict(Config())))  # another model (hidden 32)
    assert Config().model != CFG
    with Checkpointer(work / "checkpoints", save_every=1) as ck:
        ck.save(1, state0, make_meta(config={"model": to_dict(CFG), "data": {"tokenizer": "byte"}}))
    params, model_cfg, tok, step = load_model(work, step=1)
    assert (model_cfg, tok, step) == (CFG, "byte", 1) and leaves_equal(params, state0.params)
    # a checkpoint without a config in its meta: config.json is used
    (work / "config.json").write_text(json.dumps({"model": to_dict(CFG)}))
    with Checkpointer(work / "checkpoints", save_every=1) as ck:
        ck.save(2, state0, make_meta())
    assert load_model(work, step=2)[1:] == (CFG, "byte", 2)
    (work / "config.json").write_text("{\n  bad")
    with pytest.raises(ModelLoadError, match="config.json: invalid JSON at line 2"):
        load_model(work, step=2)
    assert load_model(work, step=1)[1] == CFG  # its own config: config.json not read


def test_rng_json_roundtrip():
    typed = jax.random.key(3)
    raw = jax.random.PRNGKey(3)
    back = rng_from_json(json.loads(json.dumps(rng_to_json(typed))))
    assert np.array_equal(jax.random.key_data(back), jax.random.key_data(typed))
    assert np.array_equal(jax.random.normal(back, (3,)), jax.random.normal(typed, (3,)))
    back_raw = rng_from_json(json.loads(json.dumps(rng_to_json(raw))))
    assert back_raw.dtype == jnp.uint32 and np.array_equal(back_raw, raw)
    assert rng_to_json(None) is None and rng_from_json(None) is None
    with pytest.raises(TypeError):
        make_meta(data_state={"bad": object()})


@pytest.mark.slow
def test_generate_and_export_clis(tmp_path, capsys):
    """onn-generate on a workdir, onn-export, onn-generate on the export: same greedy text."""
    from onn_jax.config import Config, DataConfig
    from onn_jax.data.tokenizer import ByteTokenizer, encode_chat
    from onn_jax.nn.generate import generate
    from onn_jax.nn.transformer import init_params
    from train import export as export_cli
    from train import generate as generate_cli

    model = ModelConfig(vocab_size=262, hidden=16, num_heads=2, max_len=64,
                        moe=MoEConfig(num_experts=4, intermediate=8))
    cfg = Config(model=model, data=DataConfig(seq_len=32))
    params = jax.jit(init_params, static_argnums=(0,))(model, jax.random.key(5))
    params = jax.device_put(params, jax.local_devices()[0])  # committed like restored params: one compile
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert generate_cli.main(["--workdir", str(work), "--prompt", "hi"]) == 2
    assert "checkpoints: no checkpoints" in capsys.readouterr().err
    with Checkpointer(work / "checkpoints") as ck:
        ck.save(3, {"step": jnp.int32(3), "params": params, "opt_state": {}}, make_meta(config=to_dict(cfg)),
                force=True)

    tok = ByteTokenizer()
    ids, _ = encode_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    want = tok.decode(generate(params, model, ids, max_new_tokens=8, eos_id=tok.eos_id))
    argv = ["--prompt", "hi", "--max-new-tokens", "8"]
    assert generate_cli.main(["--workdir", str(work)] + argv) == 0
    assert capsys.readouterr().out == want + "\n"

    assert export_cli.main([str(work), str(tmp_path / "exp")]) == 0
    assert "exported step 3" in capsys.readouterr().out
    assert generate_cli.main(["--workdir", str(tmp_path / "exp")] + argv) == 0
    assert capsys.readouterr().out == want + "\n"
    sampled = ["--workdir", str(work), "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "1",
               "--top-p", "0.9", "--seed", "4"]
    assert generate_cli.main(sampled) == 0
    first = capsys.readouterr().out
    assert generate_cli.main(sampled) == 0 and capsys.readouterr().out == first
    assert generate_cli.main(["--workdir", str(work), "--prompt", "hi", "--max-new-tokens", "500"]) == 0
    captured = capsys.readouterr()
    assert "generating 58" in captured.err  # BOS, user, "h", "i", EOS, assistant: 6 prompt tokens

    for argv_err, msg in [
        (["--workdir", str(tmp_path / "nope"), "--prompt", "x"], "no such directory"),
        (["--workdir", str(work), "--prompt", "x", "--step", "9"], "no checkpoint for step 9"),
        (["--workdir", str(work), "--prompt", "x" * 70], "model.max_len 64 leaves no room"),
        (["--workdir", str(work), "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--workdir", str(work), "--prompt", "x", "--top-p", "0"], "top_p"),
    ]:
        assert generate_cli.main(argv_err) == 2
        assert msg in capsys.readouterr().err
    assert export_cli.main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert export_cli.main([str(work), str(tmp_path / "exp")]) == 2
    assert "already holds an export" in capsys.readouterr().err
    (work / "config.json").write_text("{\n  bad")  # unused: the checkpoint's meta holds the config
    assert generate_cli.main(["--workdir", str(work)] + argv) == 0
    assert capsys.readouterr().out == want + "\n"
