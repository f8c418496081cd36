"""Adaptive softmax (model.output.kind = adaptive, onn_jax/nn/output.py): normalisation, the dense
special case, the label-only CE path against the full log-probabilities (values and gradients),
the step and eval wiring, frequency ranks, config errors, and onn-train / resume / onn-generate
sharing one cluster order."""
import json
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import ConfigError, ModelConfig, MoEConfig, OutputConfig
from onn_jax.core.losses import next_token_loss
from onn_jax.io.checkpointer import Checkpointer
from onn_jax.nn.generate import generate
from onn_jax.nn.output import adaptive_ce, adaptive_log_probs, clusters, count_labels, frequency_order, output_loss
from onn_jax.nn.transformer import Transformer, init_params
from onn_jax.parallel.rules import logical_axes_tree
from onn_jax.training.step import compute_grads
from tests.helpers import random_batch, rel_err
from train.run.evaluate import eval_forward

V, C = 40, 16
ORDER = tuple(np.random.default_rng(7).permutation(V).tolist())


def adaptive_cfg(cutoffs=(6, 17, 30), order=ORDER, div=4) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden=C, num_layers=1, num_heads=2, max_len=32,
                       moe=MoEConfig(num_experts=4, intermediate=8, router="dense"),
                       output=OutputConfig(kind="adaptive", cutoffs=cutoffs, div=div, order=order))


init = jax.jit(init_params, static_argnums=(0,))


def head_params(cfg, seed=0):
    return init(cfg, jax.random.key(seed))["output"]


def numpy_log_probs(params, h, cfg) -> np.ndarray:
    """float64 re-statement: log p(v) = log softmax(head)[cluster or id] + log softmax(tail)[id]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(h, np.float64)
    lsm = lambda z: (z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True))
                     - z.max(-1, keepdims=True))
    bounds = (0,) + tuple(cfg.output.cutoffs) + (V,)
    head = lsm(h @ p["head"])
    out = np.zeros((h.shape[0], V))
    for r, v in enumerate(cfg.output.order or range(V)):
        if r < bounds[1]:
            out[:, v] = head[:, r]
            continue
        i = max(k for k in range(1, len(bounds) - 1) if bounds[k] <= r)
        tail = p[f"tail_{i}"]
        assert tail["proj"].shape[1] == max(1, C // cfg.output.div ** i)
        out[:, v] = head[:, bounds[1] + i - 1] + lsm(h @ tail["proj"] @ tail["out"])[:, r - bounds[i]]
    return out


def test_log_probs_normalise_and_match_a_numpy_restatement():
    cfg = adaptive_cfg()
    params = head_params(cfg)
    h = jax.random.normal(jax.random.key(1), (24, C)) * 3.0
    lp = adaptive_log_probs(params, h, cfg)
    assert lp.shape == (24, V) and lp.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.logsumexp(lp, axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(lp, numpy_log_probs(params, h, cfg), atol=1e-5)


def test_one_cluster_is_the_dense_softmax_with_the_same_weights():
    h = jax.random.normal(jax.random.key(2), (10, C))
    for order in ((), ORDER):
        cfg = adaptive_cfg(cutoffs=(), order=order)
        params = head_params(cfg)
        assert set(params) == {"head"} and params["head"].shape == (C, V)
        w_dense = params["head"][:, clusters(cfg).rank]  # column v = rank(v)
        np.testing.assert_allclose(adaptive_log_probs(params, h, cfg), jax.nn.log_softmax(h @ w_dense),
                                   atol=1e-6)


def test_label_ce_equals_gathered_log_probs_and_its_gradient_equals_the_full_path():
    cfg = adaptive_cfg()
    params = head_params(cfg, seed=3)
    h = jax.random.normal(jax.random.key(4), (64, C)) * 2.0
    labels = jax.random.randint(jax.random.key(5), (64,), 0, V)
    ce, pred = jax.jit(adaptive_ce, static_argnums=3)(params, h, labels, cfg)
    lp = jax.jit(adaptive_log_probs, static_argnums=2)(params, h, cfg)
    np.testing.assert_allclose(ce, -jnp.take_along_axis(lp, labels[:, None], -1)[:, 0], atol=1e-5)
    np.testing.assert_array_equal(pred, jnp.argmax(lp, -1))
    assert len(set(np.asarray(clusters(cfg).rank)[np.asarray(labels)] >= 6)) == 2  # head and tail labels
    weights = jnp.linspace(0.5, 1.5, 64)
    via_ce = jax.jit(jax.grad(lambda p, x: jnp.sum(weights * adaptive_ce(p, x, labels, cfg)[0]), (0, 1)))(params, h)
    via_full = jax.jit(jax.grad(lambda p, x: -jnp.sum(weights * jnp.take_along_axis(
        adaptive_log_probs(p, x, cfg), labels[:, None], -1)[:, 0]), (0, 1)))(params, h)
    assert rel_err(via_ce, via_full) < 1e-5


def test_masked_positions_add_nothing():
    cfg = adaptive_cfg()
    params = {"output": head_params(cfg)}
    h = jax.random.normal(jax.random.key(6), (2, 8, C))
    b = random_batch(0, vocab=V)  # first 3 positions masked
    loss = jax.jit(lambda p, x, t: output_loss(cfg, p, x, t, b["loss_mask"])[0])
    other = b["targets"].at[:, :3].set((b["targets"][:, :3] + 11) % V)
    assert float(loss(params, h, b["targets"])) == float(loss(params, h, other))
    g_h = jax.jit(jax.grad(loss, 1))(params, h, b["targets"])
    assert float(jnp.max(jnp.abs(g_h[:, :3]))) == 0.0 and float(jnp.max(jnp.abs(g_h[:, 3:]))) > 0
    main, acc, count, ce_BxT = jax.jit(output_loss, static_argnums=0)(cfg, params, h, b["targets"], b["loss_mask"])
    assert float(count) == 10 and np.isclose(float(main), float(jnp.sum(ce_BxT[:, 3:]) / 10), atol=1e-6)


def test_step_and_eval_equal_the_full_log_prob_forward():
    """The step's label-only loss (return_hidden + output_loss) has the value and gradient of
    next-token CE on the full model's log-probabilities (a dense FFN: no gate loss); eval's loss
    too. (The surprise-gated path runs in the onn-train test below.)"""
    cfg = adaptive_cfg()
    params = init(cfg, jax.random.key(8))
    b = random_batch(1, vocab=V)
    full = lambda p: next_token_loss(Transformer(cfg).apply({"params": p}, b["inputs"])[0],
                                     b["targets"], b["loss_mask"])
    (want, (want_acc,)), want_g = jax.jit(jax.value_and_grad(lambda p: (full(p)[0], full(p)[1:2]),
                                                             has_aux=True))(params)
    grads, metrics = jax.jit(compute_grads, static_argnums=2)(params, b, cfg)
    np.testing.assert_allclose(metrics["train/main_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(metrics["train/main_acc"], want_acc)
    assert rel_err(grads, want_g) < 1e-5
    np.testing.assert_allclose(jax.jit(eval_forward, static_argnums=0)(cfg, params, b).main, want, rtol=1e-6)


def test_sharding_axes_and_greedy_generation_is_the_full_forward_argmax():
    cfg = adaptive_cfg()
    params = init(cfg, jax.random.key(9))
    axes = logical_axes_tree(params)["output"]
    assert axes["head"] == ("embed", "vocab") and axes["tail_2"] == {"proj": ("embed", "tail"),
                                                                        "out": ("tail", "vocab")}
    prompt = [3, 1, 4, 1, 5]
    new = generate(params, cfg, prompt, max_new_tokens=6)
    lp = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray([prompt + new]))[0][0]
    np.testing.assert_array_equal(new, np.argmax(np.asarray(lp), -1)[len(prompt) - 1:-1])


def test_frequency_order_is_counts_descending_ties_by_id():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 12, size=(5, 9))
    mask = (rng.random((5, 9)) > 0.3).astype(np.float32)
    counts = count_labels(targets, mask, 15)
    py = Counter(int(t) for t, m in zip(targets.ravel(), mask.ravel()) if m > 0)
    assert counts.tolist() == [py.get(v, 0) for v in range(15)]
    assert frequency_order(counts).tolist() == sorted(range(15), key=lambda v: (-py.get(v, 0), v))


@pytest.mark.parametrize("kwargs, field", [
    (dict(cutoffs=(10, 5)), "model.output.cutoffs"),
    (dict(cutoffs=(0, 5)), "model.output.cutoffs"),
    (dict(cutoffs=(5, 40)), "model.output.cutoffs"),
    (dict(div=0), "model.output.div"),
    (dict(order=(0, 1, 2)), "model.output.order"),
    (dict(order=(0,) * V), "model.output.order"),
    (dict(kind="tied"), "model.output.kind"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=V, output=OutputConfig(**{"kind": "adaptive", **kwargs}))
    assert e.value.field == field
    assert OutputConfig(cutoffs=[3, 9], order=list(range(4))).cutoffs == (3, 9)  # JSON lists -> tuples


# ---------------------------------------------------------------- onn-train, resume, onn-generate

ADAPTIVE = ("--config.model.output.kind=adaptive", "--config.model.output.cutoffs=[16, 64]",
            "--config.checkpoint.every=10", "--config.train.eval_every=10", "--config.train.eval_batches=1",
            "--config.train.log_every=2", "--config.train.sample_tokens=4", "--config.train.plots=false")


def test_onn_train_counts_the_training_split_trains_and_resume_generate_use_the_same_clusters(tmp_path, capsys):
    from onn_jax.io.portable import load_export
    from train.common.config_loader import build_config, load
    from train.common.metrics_file import read_metrics
    from train.common.trained_model import load_model
    from train.eval_cli import saved_config
    from train.export import main as export_main
    from train.main import main
    from train.run.data import build_dataset
    from train.run.output_order import training_label_counts
    w = tmp_path / "run"
    assert main(["--config", "configs/tiny.py", "--workdir", str(w), *ADAPTIVE, "--config.train.steps=10"]) == 0
    # resume with --config: the order is counted again from the same split, equal, so accepted
    assert main(["--config", "configs/tiny.py", "--workdir", str(w), *ADAPTIVE, "--config.train.steps=20"]) == 0
    assert "resuming from step 10" in capsys.readouterr().out
    evals = [r["eval/main_loss"] for r in read_metrics(w) if "eval/main_loss" in r]  # the same held-out batch
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3, evals  # (train losses swing by domain mix)

    cfg = load("configs/tiny.py", [tuple(a[len("--config."):].split("=", 1)) for a in ADAPTIVE])
    ds = build_dataset(cfg)
    want = frequency_order(training_label_counts(ds, 262)).tolist()
    held_out = frequency_order(count_labels(ds.eval.tokens[:, 1:], ds.eval.loss_mask, 262)).tolist()
    assert want != held_out  # the split matters, so the next lines pin which one was counted
    assert json.loads((w / "config.json").read_text())["model"]["output"]["order"] == want
    ckpt = Checkpointer(w / "checkpoints", read_only=True)
    assert [ckpt.restore_meta(s)["config"]["model"]["output"]["order"] for s in (10, 20)] == [want, want]
    ckpt.close()
    params, model_cfg, _, step = load_model(w)
    assert step == 20 and list(model_cfg.output.order) == want and "output" in params
    raw, _ = saved_config(w, 20)  # what onn-eval builds its config from
    assert list(build_config(raw).model.output.order) == want
    assert export_main([str(w), str(tmp_path / "export"), "--format", "safetensors"]) == 0
    ex = load_export(tmp_path / "export")
    assert list(ex.model_cfg.output.order) == want
    assert rel_err(ex.params, jax.tree.map(np.asarray, params)) == 0.0

    # a resume whose clusters differ from the checkpoint's is refused, naming the field
    saved = json.loads((w / "config.json").read_text())
    saved["model"]["output"]["order"] = want[::-1]
    saved["train"]["steps"] = 30
    (w / "config.json").write_text(json.dumps(saved))
    assert main(["--workdir", str(w)]) == 2
    err = capsys.readouterr().err
    assert "model.output.order" in err and "(262 items)" in err and len(err) < 1000


def test_cutoffs_beyond_the_tokenizer_vocabulary_are_a_config_error(tmp_path, capsys):
    """onn-train sets model.vocab_size from a tokenizer.json after loading the config; cutoffs that
    no longer fit are one config-error line, exit 2."""
    from train.main import main
    from train.tokenizer_cli import train_tokenizer
    (tmp_path / "t.txt").write_text("hello world, hello tokens. " * 20)
    train_tokenizer([str(tmp_path / "t.txt")], 300).save(str(tmp_path / "tok.json"))
    args = ["--config", "configs/gpu_small.py", "--workdir", str(tmp_path / "w"),
            f"--config.data.tokenizer={tmp_path / 'tok.json'}", "--config.model.output.kind=adaptive",
            "--config.model.output.cutoffs=[16, 1000]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onn-train: config error: model.output.cutoffs: must be < model.vocab_size")
    assert "\n" not in err
    assert not (tmp_path / "w").exists()
