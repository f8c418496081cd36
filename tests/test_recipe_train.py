"""onn-train with the recipe options: an LR schedule logged as train/lr and continued exactly
on resume, gradient accumulation, a profiler trace, perf/tflops_per_device and perf/mfu."""
import shutil

import numpy as np
import pytest

from onn_jax.training.schedules import make_schedule
from train.common.metrics_file import read_metrics
from train.main import main
from train.run.perf import perf_metrics

RUN = ("--config.train.steps=8", "--config.checkpoint.every=4", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.sample_tokens=2",
       "--config.optim.schedule=warmup_cosine", "--config.optim.warmup_steps=3",
       "--config.optim.min_lr_ratio=0.1", "--config.optim.accum_steps=2",
       "--config.train.profile_steps=[2,3]", "--config.train.progress=False", "--config.train.plots=false")


def onn_train(workdir, *extra):
    return main(["--config", "configs/tiny.py", "--workdir", str(workdir), *RUN, *extra])


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipe8")
    assert onn_train(workdir) == 0
    return workdir


def test_lr_follows_the_schedule_and_perf_is_logged(run8):
    rows = read_metrics(run8)
    assert [r["step"] for r in rows] == list(range(1, 9))
    from train.common.config_loader import load, split_overrides
    optim = load("configs/tiny.py", split_overrides(list(RUN))[0]).optim
    lr = make_schedule(optim, 8)
    np.testing.assert_allclose([r["train/lr"] for r in rows], [float(lr(s - 1)) for s in range(1, 9)],
                               rtol=1e-6)
    assert rows[0]["train/lr"] == 0.0 and abs(rows[3]["train/lr"] - optim.lr) < 1e-9 * optim.lr * 1e3
    for r in rows[1:]:
        assert r["perf/tflops_per_device"] > 0
        assert "perf/mfu" in r and r["perf/mfu"] is None  # CPU: no known peak
    assert any((run8 / "profile").rglob("*.xplane.pb"))


def test_resume_continues_the_schedule_exactly(run8, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run8, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    assert onn_train(resumed, "--config.train.profile_steps=None") == 0
    a, b = read_metrics(resumed), read_metrics(run8)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/lr", "train/main_loss", "train/grad_norm"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=1e-6, err_msg=f"step {ra['step']} {key}")


def test_rerun_at_the_final_step_evaluates(run8, capsys):
    before = (run8 / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert onn_train(run8, "--config.train.profile_steps=None") == 0
    out = capsys.readouterr().out
    assert "nothing to train; evaluating" in out and "eval at step 8: loss" in out
    assert (run8 / "metrics.jsonl").read_text() == before


def test_perf_metrics_formula():
    from onn_jax.config import Config, from_dict
    cfg = from_dict(Config, {"data": {"batch_size": 2, "seq_len": 4}, "train": {"peak_tflops": 100.0}})
    from onn_jax.training.flops import train_flops_per_token
    out = perf_metrics(cfg, {"moe/avg_k": 3.0}, 0.5, num_devices=2, device_kind="cpu")
    expect = train_flops_per_token(cfg.model, 4, 3.0) * 8 / 0.5 / 2 / 1e12
    assert out["perf/tflops_per_device"] == pytest.approx(expect)
    assert out["perf/mfu"] == pytest.approx(expect / 100.0)
