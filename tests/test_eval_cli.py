"""onn-eval: evaluates a checkpoint (a scanned 2-layer tiny run) or an export without training;
its held-out metrics equal the training run's own final eval, nothing in the workdir changes,
bad input is one line and exit code 2."""
import hashlib
import json
import os

import numpy as np
import pytest

from train.common.metrics_file import read_metrics
from train.eval_cli import main
from train.main import main as train_main

STEPS = 4
RUN = ("--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.eval_every=0",
       "--config.train.log_every=2", "--config.model.num_layers=2", "--config.model.scan_layers=true",
       "--config.data.records_per_domain=40")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 4-step scanned tiny run (checkpoints at 2 and 4, the held-out eval logged at step 4)."""
    w = tmp_path_factory.mktemp("evalrun")
    assert train_main(["--config", "configs/tiny.py", "--workdir", str(w), *RUN, "--config.train.plots=false"]) == 0
    return w


def tree_hash(root) -> str:
    """Every path, file content and modification time under root."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files + dirs):
            p = os.path.join(d, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)} {st.st_mtime_ns} {st.st_size}".encode())
            if os.path.isfile(p):
                h.update(open(p, "rb").read())
    return h.hexdigest()


def onn_eval(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_eval_equals_the_runs_own_eval_and_writes_nothing_in_the_workdir(workdir, tmp_path, capsys):
    before = tree_hash(workdir)
    # the training run evaluated train.eval_batches (2) held-out batches at its last step
    rc, out, err = onn_eval(capsys, "--workdir", str(workdir), "--batches", "2", "--out", str(tmp_path / "e.json"))
    assert rc == 0, err
    assert tree_hash(workdir) == before
    result = json.loads(out)
    assert json.loads((tmp_path / "e.json").read_text()) == result
    assert result["step"] == STEPS and result["split"] == "held_out"
    logged = [r for r in read_metrics(workdir) if "eval/main_loss" in r][-1]
    assert logged["step"] == STEPS
    m = result["metrics"]
    for key in ("eval/main_loss", "eval/main_acc", "eval/avg_k", "eval/gate_acc", "eval/tokens"):
        assert m[key] == pytest.approx(logged[key], rel=1e-5), key
    assert np.allclose(m["eval/domain_loss"], logged["eval/domain_loss"], rtol=1e-5)
    assert result["domains"] == logged["eval/domain_names"]
    assert np.asarray(m["eval/expert_load"]).shape == (2, 4)  # routing per layer
    assert np.asarray(m["eval/domain_expert_load"]).shape == (4, 2, 4)


@pytest.mark.slow
def test_older_step_export_and_user_data(workdir, tmp_path, capsys):
    from train.export import main as export_main
    rc, out, err = onn_eval(capsys, "--workdir", str(workdir), "--step", "2", "--batches", "1")
    assert rc == 0, err
    at2 = json.loads(out)
    assert at2["step"] == 2
    # an export (converted to the per-layer layout) gives the checkpoint's numbers
    assert export_main([str(workdir), str(tmp_path / "ex"), "--step", "2", "--layout", "per_layer"]) == 0
    capsys.readouterr()
    rc, out, err = onn_eval(capsys, "--workdir", str(tmp_path / "ex"), "--batches", "1")
    assert rc == 0, err
    ex = json.loads(out)
    assert ex["step"] == 2 and ex["metrics"]["eval/main_loss"] == pytest.approx(at2["metrics"]["eval/main_loss"],
                                                                                rel=1e-6)
    # user data: every record of a text file
    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    rc, out, err = onn_eval(capsys, "--workdir", str(workdir), f"--config.data.source={text}", "--split", "all")
    assert rc == 0, err
    mine = json.loads(out)
    assert mine["data"]["source"] == str(text) and mine["metrics"]["eval/tokens"] >= 60
    assert np.isfinite(mine["metrics"]["eval/main_loss"])


@pytest.mark.parametrize("argv,needle", [
    (["--workdir", "/nonexistent/run"], "--workdir /nonexistent/run: no such directory"),
    (["--step", "3"], "step 3"),
    (["--step", "-1"], "--step -1"),
    (["--batches", "0"], "--batches 0"),
    (["--config.model.hidden=8"], "--config.model.hidden=8"),
    (["--config.data.nope=1"], "--config.data.nope"),
    (["--config.data.seq_len=1000"], "data.seq_len"),
    (["--split", "all"], "--split all"),
    (["--out", "DIR"], "is a directory"),
    (["--out", "WORKDIR/e.json"], "inside --workdir"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys, argv, needle):
    argv = [a.replace("WORKDIR", str(workdir)).replace("DIR", str(tmp_path)) if a.isupper() or "WORKDIR" in a
            else a for a in argv]
    if "--workdir" not in argv:
        argv = ["--workdir", str(workdir), *argv]
    before = tree_hash(workdir)
    rc, out, err = onn_eval(capsys, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onn-eval: error: ") and needle in lines[0], err
    assert tree_hash(workdir) == before


@pytest.mark.slow
def test_router_state_is_restored_and_used(tmp_path, capsys):
    """A stateful-routing checkpoint (model.moe.aux_free_rate): onn-eval routes with its saved
    router bias (restored without the optimizer state), as train.run.evaluate does with it."""
    import dataclasses
    import itertools

    import jax
    import jax.numpy as jnp

    from onn_jax.config import to_dict
    from onn_jax.io.checkpoint_meta import make_meta
    from onn_jax.io.checkpointer import Checkpointer
    from onn_jax.training.optimizer import make_optimizer
    from onn_jax.training.options.router_state import forward_params
    from onn_jax.training.state import init_state
    from train.common.config_loader import load
    from train.run.data import build_dataset
    from train.run.evaluate import evaluate, make_eval_step
    cfg = load("configs/tiny.py", [("model.moe.router", "topk"), ("model.moe.top_k", "2"),
                                   ("model.moe.aux_free_rate", "0.01")])
    state = init_state(cfg.model, make_optimizer(cfg.optim), jax.random.key(0))
    bias = jax.tree.map(lambda x: x + jnp.arange(x.shape[-1]) * 0.5, state.router_state)
    state = dataclasses.replace(state, router_state=bias)
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    with Checkpointer(tmp_path / "checkpoints", save_every=1) as ck:
        ck.save(1, state, make_meta(config=to_dict(cfg)))
    rc, out, err = onn_eval(capsys, "--workdir", str(tmp_path), "--batches", "1")
    assert rc == 0, err
    load_E = json.loads(out)["metrics"]["eval/expert_load"]
    ds = build_dataset(cfg)
    ref = evaluate(make_eval_step(cfg.model, len(ds.domains)), forward_params(state.params, bias),
                   itertools.islice(ds.eval_batches(cfg.data.batch_size), 1))
    assert np.allclose(load_E, ref["eval/expert_load"]) and np.ptp(load_E) > 0.5  # the bias shifts the load
