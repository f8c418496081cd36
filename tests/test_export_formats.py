"""onn-export formats: orbax, safetensors and npz folders that carry their tokenizer, config and
model card; load_export rebuilds the model (logits equal the original's), and the files read
with safetensors / numpy alone; onn-generate loads a moved export, --tokenizer overrides."""
import json
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("orbax.checkpoint")

from onn_jax.config import (  # noqa: E402
    ModelConfig,
    MoEConfig,
    to_dict,  # noqa: E402
)
from onn_jax.data.tokenizer import ByteTokenizer, tokenizer_info  # noqa: E402
from onn_jax.io.checkpoint_meta import make_meta  # noqa: E402
from onn_jax.io.checkpointer import Checkpointer  # noqa: E402
from onn_jax.io.portable import load_export, write_export  # noqa: E402
from onn_jax.nn.transformer import Transformer, init_params  # noqa: E402
from train.export import main as export_main  # noqa: E402
from train.generate import main as generate_main  # noqa: E402

CFG = ModelConfig(vocab_size=300, hidden=16, num_layers=2, num_heads=2, max_len=32,
                  moe=MoEConfig(num_experts=4, intermediate=16))
TOKENS = np.arange(2 * 12, dtype=np.int32).reshape(2, 12) % 262


def make_checkpoint(directory, tok_name, tok):
    params = init_params(CFG, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(  # non-zero thresholds: a wrong key would show
        lambda p, x: x + 0.3 if "thresholds" in jax.tree_util.keystr(p) else x, params)
    meta = make_meta(config={"model": to_dict(CFG), "data": {"tokenizer": tok_name}},
                     tokenizer=tokenizer_info(tok_name, tok))
    with Checkpointer(directory, save_every=1) as ck:
        ck.save(7, {"params": params}, meta)
    return params


def logits(params, cfg=CFG):
    return np.asarray(Transformer(cfg).apply({"params": params}, TOKENS)[0])


@pytest.mark.parametrize("fmt", ["orbax", "safetensors", "npz"])
def test_each_format_round_trips_and_reads_without_onn_jax(tmp_path, fmt):
    params = make_checkpoint(tmp_path / "ck", "byte", ByteTokenizer())
    assert write_export(tmp_path / "ck", tmp_path / "out", fmt=fmt) == 7
    shutil.move(tmp_path / "out", tmp_path / "moved")  # self-contained: any path
    ex = load_export(tmp_path / "moved")
    assert ex.step == 7 and ex.model_cfg == CFG and isinstance(ex.tokenizer, ByteTokenizer)
    np.testing.assert_array_equal(logits(ex.params), logits(params))
    out = tmp_path / "moved"
    cfg = json.loads((out / "config.json").read_text())
    n = sum(x.size for x in jax.tree.leaves(params))
    assert cfg["model_type"] == "onn-jax-moe" and cfg["num_parameters"] == n and cfg["model"] == to_dict(CFG)
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok["kind"], tok["pad_id"], tok["bos_id"], tok["eos_id"]) == ("byte", 256, 257, 258)
    assert tok["role_ids"]["assistant"] == [261] and tok["special_tokens"]["<|user|>"] == 260
    card = (out / "README.md").read_text()
    assert f"{n:,}" in card and "BEFORE the sigmoid" in card and "`block_1.moe.thresholds`" in card
    want = np.asarray(params["block_1"]["moe"]["thresholds"])
    if fmt == "safetensors":  # as the README shows: safetensors alone
        from safetensors.numpy import load_file
        got = load_file(str(out / "model.safetensors"))["block_1.moe.thresholds"]
    elif fmt == "npz":
        got = np.load(out / "params.npz")["block_1.moe.thresholds"]
    else:  # orbax alone, no target
        import orbax.checkpoint as ocp
        got = ocp.PyTreeCheckpointer().restore(str(out / "params"))["block_1"]["moe"]["thresholds"]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_moved_export_carries_its_hf_tokenizer(tmp_path, capsys):
    from onn_jax.data.tokenizer import HFTokenizer
    from train.tokenizer_cli import train_tokenizer
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello tokens. " * 20)
    train_tokenizer([str(text)], 300).save(str(tmp_path / "tok.json"))
    make_checkpoint(tmp_path / "ck", str(tmp_path / "tok.json"), HFTokenizer(tmp_path / "tok.json"))
    shutil.move(tmp_path / "tok.json", tmp_path / "elsewhere.json")  # the run's tokenizer moved away
    assert export_main([str(tmp_path / "ck"), str(tmp_path / "out"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onn-export: error: tokenizer ") and "pass --tokenizer PATH" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert export_main([str(tmp_path / "ck"), str(tmp_path / "out2"), "--format", "safetensors",
                        "--tokenizer", str(tmp_path / "elsewhere.json")]) == 0
    (tmp_path / "elsewhere.json").unlink()
    shutil.move(tmp_path / "out2", tmp_path / "moved")
    assert (tmp_path / "moved" / "tokenizer.json").is_file()
    capsys.readouterr()
    args = ["--workdir", str(tmp_path / "moved"), "--prompt", "hello", "--raw", "--max-new-tokens", "3"]
    assert generate_main(args) == 0
    assert generate_main(args + ["--tokenizer", "byte"]) == 0  # the override is used (262 <= 300 ids)
    assert generate_main(args + ["--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: tokenizer file not found" in capsys.readouterr().err


def test_stateful_routing_travels_with_exports_and_generation(tmp_path, capsys):
    """A model that routes with router state (the aux-loss-free bias): onn-export writes the bias
    into the params, load_export and onn-generate (workdir or export) route with it, so the
    export's logits equal the trained model's; --layout stacked is refused before writing."""
    import dataclasses

    from onn_jax.training.options.router_state import forward_params, init_router_state
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, router="topk", top_k=2, aux_free_rate=0.01))
    params = init_params(cfg, jax.random.key(1))
    rs = jax.tree.map(lambda x: x + np.arange(x.shape[-1], dtype=np.float32) * 0.7, init_router_state(cfg))
    want = logits(forward_params(params, rs), cfg)
    assert not np.allclose(want, logits(forward_params(params, init_router_state(cfg)), cfg))  # the bias routes
    wd = tmp_path / "wd"
    conf = {"model": to_dict(cfg), "data": {"tokenizer": "byte"}}
    with Checkpointer(wd / "checkpoints", save_every=1) as ck:
        ck.save(7, {"params": params, "router_state": rs},
                make_meta(config=conf, tokenizer=tokenizer_info("byte", ByteTokenizer())))
    (wd / "config.json").write_text(json.dumps(conf))
    assert export_main([str(wd), str(tmp_path / "st"), "--layout", "stacked"]) == 2
    assert "--layout stacked: this model routes with router state" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()
    assert write_export(wd / "checkpoints", tmp_path / "out", fmt="safetensors") == 7
    ex = load_export(tmp_path / "out")
    np.testing.assert_array_equal(logits(ex.params, cfg), want)
    args = ["--prompt", "12 + 7", "--raw", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert generate_main(["--workdir", str(wd), *args]) == 0
    from_workdir = capsys.readouterr().out
    assert generate_main(["--workdir", str(tmp_path / "out"), *args]) == 0
    assert capsys.readouterr().out == from_workdir and from_workdir
