"""onn-train end to end on configs/tiny.py: outputs, falling loss, exact resume, errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onn_jax.config import Config, from_dict
from onn_jax.data.tokenizer import ByteTokenizer, encode_chat
from onn_jax.io.checkpointer import Checkpointer
from onn_jax.nn.transformer import Transformer
from tests.helpers import needs_devices
from train.common.config_loader import load
from train.common.metrics_file import read_metrics
from train.main import main
from train.run.progress import progress_fields
from train.run.sample import sample

TINY = "configs/tiny.py"
TRAIN_KEYS = {"step", "time", "train/main_loss", "train/main_acc", "train/total_loss", "train/grad_norm",
              "train/epoch", "moe/avg_k", "moe/gate_acc", "moe/gate_loss", "moe/expert_load",
              "moe/thresholds", "perf/tokens_per_sec", "perf/step_time_s"}
EVAL_KEYS = {"eval/main_loss", "eval/main_acc", "eval/gate_acc", "eval/avg_k", "eval/surprise_hist",
             "eval/surprise_edges", "eval/domain_loss", "eval/domain_expert_load", "eval/domain_names"}


RUN = ("--config.train.steps=30", "--config.checkpoint.every=10", "--config.train.eval_every=7")
LOGGED = [1, 5, 7, 10, 14, 15, 20, 21, 25, 28, 30]  # every 5, eval every 7, first and last


def onn_train(workdir, *overrides):
    return main(["--config", TINY, "--workdir", str(workdir), *overrides])


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
    """A 30-step tiny run: logs every 5 steps, eval every 7, checkpoints every 10 (keeps 2)."""
    workdir = tmp_path_factory.mktemp("tiny30")
    assert onn_train(workdir, *RUN) == 0
    return workdir


def test_workdir_layout(run30):
    cfg = from_dict(Config, json.loads((run30 / "config.json").read_text()))
    assert cfg.train.steps == 30 and cfg.checkpoint.every == 10 and cfg.model.moe.num_experts == 4
    assert sorted(p.name for p in (run30 / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]
    assert list((run30 / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (run30 / "plots").glob("*.png")} == {
        "loss.png", "gate.png", "expert_load.png", "surprise.png", "domain_routing.png"}


def test_metrics_rows_and_keys(run30):
    rows = read_metrics(run30)
    assert [r["step"] for r in rows] == LOGGED
    perf = {"perf/tokens_per_sec", "perf/step_time_s"}
    for r in rows[1:]:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
    # step 1 is logged alone (the initial loss); its time is compilation, not throughput
    assert TRAIN_KEYS - perf <= set(rows[0]) and not perf & set(rows[0])
    assert "perf/compile_s" in rows[0] and all("perf/compile_s" not in r for r in rows[1:])
    evals = [r["step"] for r in rows if "eval/main_loss" in r]
    assert evals == [7, 14, 21, 28, 30]  # eval_every=7 (off the log grid), and at the end
    last = rows[-1]
    assert EVAL_KEYS <= set(last), EVAL_KEYS - set(last)
    assert np.asarray(last["moe/expert_load"]).shape == (1, 4)
    assert np.asarray(last["eval/domain_expert_load"]).shape == (4, 1, 4)
    assert last["eval/domain_names"] == ["arithmetic", "brackets", "prose", "strings"]
    hist = np.asarray(last["eval/surprise_hist"])
    assert hist.shape == (1, 40) and hist.sum() > 0
    assert 1.0 <= last["moe/avg_k"] <= 4.0
    # no gated heads or slot embedding: no attn/embed metrics, bar fields or plots (test_workdir_layout)
    assert not [k for r in rows for k in r if k.startswith(("attn/", "embed/", "eval/attn_", "eval/embed_"))]
    assert not {"attn_k", "attn_acc_inf", "emb_k", "emb_acc_inf"} & set(progress_fields(last))


def test_loss_falls(run30):
    rows = read_metrics(run30)
    first, last = rows[0]["train/main_loss"], rows[-1]["train/main_loss"]
    assert first > 5.0  # about log(262) = 5.57 at initialisation
    assert last < first - 0.8, (first, last)


@pytest.mark.slow
def test_resume_continues_exactly(run30, tmp_path, capsys):
    """Drop the step-30 checkpoint, rerun: it resumes at 20 and reproduces the straight run
    (with train.plots=false, a setting free to change on resume: no dashboards drawn)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run30, resumed)
    shutil.rmtree(resumed / "checkpoints" / "30")
    shutil.rmtree(resumed / "plots")
    capsys.readouterr()
    assert onn_train(resumed, *RUN, "--config.train.plots=false") == 0
    assert not (resumed / "plots").exists()
    out = capsys.readouterr()
    assert "resuming from step 20" in out.out + out.err and "trained steps 20 -> 30" in out.out
    a, b = read_metrics(resumed), read_metrics(run30)
    assert [r["step"] for r in a] == [r["step"] for r in b] == LOGGED
    for ra, rb in zip(a, b):
        for key in ("train/main_loss", "moe/gate_acc", "moe/avg_k", "train/grad_norm", "moe/expert_load"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=1e-6, err_msg=f"step {ra['step']} {key}")
    np.testing.assert_allclose(a[-1]["eval/main_loss"], b[-1]["eval/main_loss"], rtol=1e-6)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]


def test_rerun_at_final_step_trains_nothing(run30, tmp_path, capsys):
    workdir = tmp_path / "again"
    shutil.copytree(run30, workdir)
    capsys.readouterr()
    assert onn_train(workdir, *RUN) == 0
    out = capsys.readouterr()
    assert "nothing to train" in out.out + out.err and "trained steps 30 -> 30" in out.out
    assert [r["step"] for r in read_metrics(workdir)] == LOGGED


def test_config_errors_exit_2(tmp_path, capsys):
    assert onn_train(tmp_path, "--config.model.moe.num_expert=3") == 2
    assert "--config.model.moe.num_expert" in capsys.readouterr().err
    assert onn_train(tmp_path, "--config.model.vocab_size=100") == 2
    assert "model.vocab_size: must be >= the tokenizer's vocab size 262" in capsys.readouterr().err
    assert onn_train(tmp_path, "--config.data.source=" + str(tmp_path / "none.jsonl")) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_sample_is_deterministic_greedy_argmax(run30):
    cfg = load(TINY)
    with Checkpointer(run30 / "checkpoints", read_only=True) as ckpt:
        params, _ = ckpt.restore_params()
    tok, prompt, n = ByteTokenizer(), "What is 2 + 3?", 10
    text = sample(params, cfg, tok, prompt, n)
    assert sample(params, cfg, tok, prompt, n) == text
    seq, _ = encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    new = []
    forward = jax.jit(Transformer(cfg.model).apply)  # compiled once per length (op by op: 3x slower)
    for _ in range(n):  # greedy by hand: argmax of the full, uncached forward
        logits, _ = forward({"params": params}, jnp.asarray([seq + new]))
        token = int(jnp.argmax(logits[0, -1]))
        if token == tok.eos_id:
            break
        new.append(token)
    assert text == tok.decode(new)


@needs_devices(8)
@pytest.mark.slow
def test_sharded_run_resumes_on_another_mesh(run30, tmp_path, capsys):
    """8 forced CPU devices: data-parallel run, then resumed with experts split over 4 devices;
    it matches the 1-device run of the module fixture to float tolerance."""
    workdir = tmp_path / "mesh"
    assert onn_train(workdir, *RUN, "--config.train.steps=10", "--config.mesh.data=8") == 0
    capsys.readouterr()
    assert onn_train(workdir, *RUN, "--config.train.steps=20", "--config.mesh.data=2",
                     "--config.mesh.expert=4") == 0
    assert "resuming from step 10" in capsys.readouterr().out
    sharded, single = read_metrics(workdir), [r for r in read_metrics(run30) if r["step"] <= 20]
    assert [r["step"] for r in sharded] == [r["step"] for r in single] == LOGGED[:7]
    for rs, r1 in zip(sharded, single):
        np.testing.assert_allclose(rs["train/main_loss"], r1["train/main_loss"], rtol=1e-4)
        np.testing.assert_allclose(rs["moe/expert_load"], r1["moe/expert_load"], atol=1e-3)
