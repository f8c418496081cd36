"""onn-experiment end to end on a tiny 2-run grid (routing and forgetting), and its errors."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from train.experiment import grid
from train.experiment.analysis import unit_metrics
from train.experiment.cells import cell_configs, config_hash
from train.experiment.cli import main as experiment_main
from train.experiment.grid import run_experiment
from train.experiment.parallel import ParallelCells
from train.experiment.spec import ExperimentError, load_experiment, run_config

TINY = {"model.moe.num_experts": 4, "data.records_per_domain": 40, "data.batch_size": 4,
        "data.seq_len": 32, "train.steps": 4, "train.log_every": 2, "train.eval_every": 2,
        "train.eval_batches": 1, "checkpoint.enabled": False, "train.plots": False}


def _write(tmp_path, kind="routing", runs=None, **extra):
    exp = {"name": "t", "base": str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"), "kind": kind,
           "overrides": TINY, "seeds": [0],
           "runs": runs or {"smk": {}, "dense": {"model.moe.router": "dense", "model.heads.router": "surprise"}},
           **extra}
    path = tmp_path / "exp.py"
    path.write_text(f"def get_experiment():\n    return {exp!r}\n")
    return path


@pytest.mark.slow
def test_routing_grid_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert experiment_main([str(_write(tmp_path)), "--out", str(out), "--compile-cache", "none"]) == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r["seed"]) for r in rows] == [("smk", 0), ("dense", 0)]
    smk, dense = rows
    assert len(smk["analysis/nmi"]) == 1 and 0 <= smk["analysis/nmi"][0] <= 1
    assert 1 <= smk["analysis/avg_k"] <= 4 and 0 <= smk["analysis/gate_acc_unmasked"][0] <= 1
    assert len(smk["analysis/domain_loss"]) == 4 and "analysis/avg_k" not in dense
    # gated heads (the dense-MoE row): avg_k per layer in [1, H], NMI in [0, 1], fallback share;
    # the domain means weighted by the domains' tokens give back the overall avg_k
    assert "analysis/head_avg_k" not in smk and len(dense["analysis/head_nmi"]) == 1
    assert 1 <= dense["analysis/head_avg_k"] <= 4 and 0 <= dense["analysis/head_nmi"][0] <= 1
    assert 0 <= dense["analysis/head_fallback_frac"][0] <= 1 and 0 <= dense["analysis/head_gate_acc_unmasked"][0] <= 1
    import jax

    from onn_jax.nn.transformer import init_params
    cfg = run_config(load_experiment(_write(tmp_path)), "dense", 0)
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    assert dense["params"] == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    table = (out / "results.md").read_text()
    assert "| smk |" in table and "| dense |" in table and "Eval loss per domain" in table
    assert "head NMI per layer" in table and "slot NMI" not in table  # unit columns only where present
    for name in ("metrics.png", "curves.png", "domain_expert.png"):
        assert (out / "plots" / name).stat().st_size > 0
    metrics = [json.loads(l) for l in (out / "runs/smk/seed_0/metrics.jsonl").read_text().splitlines()]
    assert any("analysis/nmi" in m for m in metrics)  # logged at every eval
    # --parallel: the cell as a process of its own gives the same row (CPU runs are deterministic)
    par = tmp_path / "par"
    assert experiment_main([str(_write(tmp_path)), "--out", str(par), "--only", "dense", "--parallel", "2",
                            "--compile-cache", "none"]) == 0
    (row,) = [json.loads(l) for l in (par / "results.jsonl").read_text().splitlines()]
    assert {k: v for k, v in row.items() if k != "time_s"} == {k: v for k, v in dense.items() if k != "time_s"}
    assert (par / "runs/dense/seed_0/metrics.jsonl").is_file() and (par / "cells/dense_seed0.log").is_file()
    assert all(len(r["config_hash"]) == 16 for r in rows)
    # Re-running skips finished cells.
    assert experiment_main([str(_write(tmp_path)), "--out", str(out), "--compile-cache", "none"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "results:" in capsys.readouterr().out


@pytest.mark.slow
def test_forgetting_continues_the_first_phase_and_measures_the_rise(tmp_path):
    phases = {"first": ["arithmetic"], "second": ["prose"], "first_steps": 3, "second_steps": 2}
    out = tmp_path / "out"
    rc = experiment_main([str(_write(tmp_path, "forgetting", {"smk": {}}, phases=phases)), "--out", str(out),
                          "--compile-cache", "none"])
    assert rc == 0
    (row,) = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert row["forget/rise"] == pytest.approx(row["forget/first_loss_after"] - row["forget/first_loss_before"])
    first = (out / "data/first.jsonl").read_text().splitlines()
    assert first and all(json.loads(l)["domain"] == "arithmetic" for l in first)
    second = [json.loads(l) for l in (out / "runs/smk/seed_0/second/metrics.jsonl").read_text().splitlines()]
    assert second[-1]["step"] == 2  # phase 2 ran its own steps from the phase-1 state


def test_bad_experiment_files_name_the_file_and_key(tmp_path, capsys):
    bad = _write(tmp_path, runs={"x": {"model.moe.nope": 1}})
    with pytest.raises(ExperimentError, match=r"exp.py: runs\['x'\]: unknown config key 'model.moe.nope'"):
        run_config(load_experiment(bad), "x", 0)
    with pytest.raises(ExperimentError, match="kind must be one of"):
        load_experiment(_write(tmp_path, kind="nope"))
    with pytest.raises(ExperimentError, match="phases must have"):
        load_experiment(_write(tmp_path, kind="forgetting"))
    with pytest.raises(ExperimentError, match="num_experts"):
        bad_runs = {"x": {"model.moe.num_experts": 0}}
        run_config(load_experiment(_write(tmp_path, runs=bad_runs)), "x", 0)
    assert experiment_main([str(bad), "--only", "y"]) == 2
    assert "unknown labels ['y']" in capsys.readouterr().err


def test_shipped_experiment_files_load():
    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    routing = load_experiment(root / "routing.py")
    forgetting = load_experiment(root / "forgetting.py")
    assert routing["kind"] == "routing" and routing["seeds"] == [0, 1, 2]
    assert {"smk_faithful", "smk_advantage", "smk_learning_cost", "topk_lb", "dense"} <= set(routing["runs"])
    assert forgetting["kind"] == "forgetting" and forgetting["runs"] == routing["runs"]
    assert set(forgetting["phases"]["first"]).isdisjoint(forgetting["phases"]["second"])
    assert Path(routing["base"]).resolve() == (root.parent / "tiny.py").resolve()
    phase2, bpe = (load_experiment(root / f) for f in ("phase2.py", "phase2_bpe.py"))
    assert phase2["vary_data"] and bpe["seeds"] == phase2["seeds"] == [0, 1, 2]
    assert {"base", "heads_og", "heads_adv", "heads_topk", "embed_ngram2"} <= set(phase2["runs"])
    cfg = run_config(bpe, "bpe_adaptive", 0)  # the committed 2048-id BPE, its vocabulary
    from onn_jax.data.tokenizer import load_tokenizer
    assert load_tokenizer(cfg.data.tokenizer).vocab_size == cfg.model.vocab_size == 2048
    research, gpu, fresh = (load_experiment(root / f)
                            for f in ("research.py", "research_gpu.py", "research_gpu_fresh.py"))
    assert set(research["runs"]) < set(gpu["runs"]) == set(fresh["runs"])  # + the top-8/16 controls
    assert set(gpu["baselines"]) == {"topk_lb", "topk_auxfree", "topk8_lb"} and fresh["vary_data"]
    small, big = run_config(gpu, "topk8_lb", 1), run_config(fresh, "v_adv_budget_hi", 2)
    assert (small.model.moe.top_k, small.model.moe.router, small.data.seed) == (8, "topk", 1)
    assert ((big.model.moe.w_budget, big.data.records_per_domain, big.train.steps, big.train.eval_every)
            == (1.0, 100_000, 600, 100))


class _FakeCells:
    """Stands in for training: run_cell returns a row at once and records the cells it ran."""

    def __init__(self, monkeypatch):
        self.ran = []
        monkeypatch.setattr(grid, "full_dataset", lambda cfg: object())
        monkeypatch.setattr(grid, "run_cell", self.run_cell)
        monkeypatch.setattr(grid, "markdown_table", lambda exp, rows: f"{len(rows)} rows")
        monkeypatch.setattr(grid, "make_plots", lambda exp, rows, out: [])

    def run_cell(self, exp, label, seed, out, full_ds, phase_paths=None):
        from onn_jax.config import to_dict
        self.ran.append((label, seed))
        cfg = run_config(exp, label, seed)
        if exp["kind"] == "routing":  # the run directory a real cell leaves
            workdir = out / "runs" / label / f"seed_{seed}"
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(to_dict(cfg)))
        return {"label": label, "seed": seed, "steps": cfg.train.steps, "time_s": 0.0}


def test_rerun_skips_only_rows_of_the_same_config(tmp_path, monkeypatch):
    """A quick --steps run followed by the full run: the full run re-runs and replaces the rows."""
    cells = _FakeCells(monkeypatch)
    exp, out, logs = load_experiment(_write(tmp_path)), tmp_path / "out", []
    read = lambda: [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    run_experiment(exp, out, steps=2, log=logs.append)
    assert cells.ran == [("smk", 0), ("dense", 0)]
    quick = read()
    assert [(r["label"], r["steps"]) for r in quick] == [("smk", 2), ("dense", 2)]
    assert quick[0]["config_hash"] != quick[1]["config_hash"]  # other router, other config
    cells.ran.clear()
    run_experiment(exp, out, steps=2, log=logs.append)
    assert cells.ran == [] and read() == quick  # same settings: skipped
    logs.clear()
    rows = run_experiment(exp, out, log=logs.append)  # the file's train.steps (4)
    assert cells.ran == [("smk", 0), ("dense", 0)]
    assert [(r["label"], r["steps"]) for r in read()] == [("smk", 4), ("dense", 4)]  # replaced, not appended
    assert [r["steps"] for r in rows] == [4, 4]
    assert all(a["config_hash"] != b["config_hash"] for a, b in zip(quick, read()))
    replaced = [l for l in logs if "re-running and replacing" in l]
    assert len(replaced) == 2 and "smk seed 0: the results.jsonl row was made with other settings" in replaced[0]
    # another seed only adds its row; the rows of the other cells stay as they were
    cells.ran.clear()
    run_experiment(exp, out, seeds=[1], only=["smk"], log=logs.append)
    assert cells.ran == [("smk", 1)] and [(r["label"], r["seed"]) for r in read()] == [
        ("smk", 0), ("dense", 0), ("smk", 1)]
    # the replaced rows' run directories are set aside, not overwritten (onn-train refuses that)
    aside = out / "runs/smk" / f"seed_0.replaced-{quick[0]['config_hash']}"
    assert json.loads((aside / "config.json").read_text())["train"]["steps"] == 2
    assert json.loads((out / "runs/smk/seed_0/config.json").read_text())["train"]["steps"] == 4
    assert any(f"moved to {aside}" in l for l in logs)
    # a run cut before its row was written: kept when it is this cell's (resumable), else set aside
    path = out / "results.jsonl"
    path.write_text("".join(l + "\n" for l in path.read_text().splitlines() if '"smk"' not in l))
    logs.clear()
    run_experiment(exp, out, only=["smk"], log=logs.append)
    assert not any("moved" in l for l in logs) and not (out / "runs/smk/seed_0.replaced-unfinished").exists()
    path.write_text("".join(l + "\n" for l in path.read_text().splitlines() if '"smk"' not in l))
    run_experiment(exp, out, only=["smk"], steps=3, log=logs.append)
    assert (out / "runs/smk/seed_0.replaced-unfinished/config.json").exists()


def test_results_with_a_torn_last_line_or_no_hash(tmp_path, monkeypatch):
    cells = _FakeCells(monkeypatch)
    exp, out = load_experiment(_write(tmp_path)), tmp_path / "out"
    run_experiment(exp, out, log=lambda _: None)
    path = out / "results.jsonl"
    good = path.read_text()
    # a kill mid-write: the half-written row is dropped, the finished ones are kept
    path.write_text(good + '{"label": "smk", "se')
    cells.ran.clear()
    run_experiment(exp, out, log=lambda _: None)
    assert cells.ran == []
    # a row without a hash or configs (older results) is re-run; the rewrite also drops the torn tail
    rows = [json.loads(l) for l in good.splitlines()]
    del rows[1]["config_hash"], rows[1]["configs"]
    shutil.rmtree(out / "runs" / "dense")                 # nor a run directory to read them from
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"lab')
    logs = []
    run_experiment(exp, out, log=logs.append)
    assert cells.ran == [("dense", 0)] and any("config unrecorded" in l for l in logs)
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    # a malformed line that is not the last is an error naming the line
    path.write_text("{oops\n" + good)
    with pytest.raises(ExperimentError, match=r"results.jsonl:1: malformed JSON line"):
        run_experiment(exp, out, log=lambda _: None)


def test_rows_made_before_a_field_existed_are_reused_only_at_its_default(tmp_path, monkeypatch):
    """A new option (a field the stored configs lack) at its default reuses the row; the option
    set, a changed shared field, or a field the code no longer has re-runs the cell. Rows from
    before configs were stored fall back to the run directory's config.json (routing)."""
    cells = _FakeCells(monkeypatch)
    exp, out, logs = load_experiment(_write(tmp_path)), tmp_path / "out", []
    path = out / "results.jsonl"
    run_experiment(exp, out, only=["smk"], log=logs.append)
    (made,) = [json.loads(l) for l in path.read_text().splitlines()]
    assert made["configs"][0]["model"]["moe"]["kl_temperature"] == 1.0

    def older(edit, drop_configs=False):
        row = json.loads(json.dumps(made))
        row["config_hash"] = "0" * 16                     # made by older code: another hash
        edit(row["configs"][0])
        if drop_configs:                                  # older still: only the run dir has them
            run = out / "runs/smk/seed_0"
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps(row.pop("configs")[0]))
        path.write_text(json.dumps(row) + "\n")
        cells.ran.clear(), logs.clear()

    def rerun(e=exp):
        run_experiment(e, out, only=["smk"], log=logs.append)
        return cells.ran == [("smk", 0)]

    def forget(*dotted):  # the stored configs without these fields
        def edit(config):
            for name in dotted:
                *parents, last = name.split(".")
                node = config
                for p in parents:
                    node = node[p]
                del node[last]
        return edit

    older(forget("model.moe.kl_temperature"))
    assert not rerun() and "made before model.moe.kl_temperature existed; the cell leaves it at its default" in logs[0]
    assert json.loads(path.read_text())["configs"] == made["configs"]   # the row now stores today's configs
    older(forget("model.heads", "train.peak_tflops"))                    # a whole sub-config, and a field
    assert not rerun() and "made before model.heads, train.peak_tflops existed" in logs[0]
    assert "them at their defaults" in logs[0]
    older(forget("model.moe.kl_temperature"), drop_configs=True)
    assert not rerun()
    older(forget("model.moe.kl_temperature"))
    assert rerun({**exp, "overrides": {**exp["overrides"], "model.moe.kl_temperature": 0.5}})  # option set
    older(lambda c: c["train"].update(steps=3))
    assert rerun() and "re-running and replacing it" in logs[0]          # a shared field differs
    older(lambda c: c["model"]["moe"].update(retired_option=1))
    assert rerun()                                                        # a field the code lost
    older(forget("model.moe.kl_temperature"), drop_configs=True)
    (out / "runs/smk/seed_0/config.json").write_text("{oops")
    assert rerun()                                                        # unreadable: not reused


def test_parallel_cells_report_failures_and_keep_the_finished(tmp_path, monkeypatch):
    """--parallel's bookkeeping with stand-in cell processes: a finished cell's row is written and
    its run directory moved into runs/; a failed one is named with its exit code and log."""
    _FakeCells(monkeypatch)
    exp, out, logs = load_experiment(_write(tmp_path)), tmp_path / "out", []
    cell_script = {
        "smk": "import json, pathlib, sys; o = pathlib.Path(sys.argv[1]); "
               "(o / 'runs/smk/seed_0').mkdir(parents=True); (o / 'runs/smk/seed_0/metrics.jsonl').write_text('x'); "
               "(o / 'results.jsonl').write_text(json.dumps({'label': 'smk', 'seed': 0, 'time_s': 1.0}) + chr(10))",
        "dense": "import sys; print('boom'); sys.exit(3)",
    }
    monkeypatch.setattr(ParallelCells, "command",
                        lambda self, label, seed, cell_out: [sys.executable, "-c", cell_script[label], str(cell_out)])
    parallel = ParallelCells(str(tmp_path / "exp.py"), jobs=2)
    failed = r"1 of 2 cells failed: dense seed 0 \(exit code 3; log .*dense_seed0.log\)"
    with pytest.raises(ExperimentError, match=failed):
        run_experiment(exp, out, parallel=parallel, log=logs.append)
    (row,) = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert row["label"] == "smk" and len(row["config_hash"]) == 16 and row["configs"]
    assert (out / "runs/smk/seed_0/metrics.jsonl").read_text() == "x"
    assert "boom" in (out / "cells/dense_seed0.log").read_text()
    assert experiment_main([str(tmp_path / "exp.py"), "--parallel", "0", "--out", str(out)]) == 2


def test_parallel_cells_spread_over_gpus(tmp_path, monkeypatch):
    """--gpus: each cell process sees one GPU (CUDA_VISIBLE_DEVICES), the least busy one."""
    _FakeCells(monkeypatch)
    exp, out = load_experiment(_write(tmp_path, seeds=[0, 1])), tmp_path / "out"
    script = ("import json, os, pathlib, sys, time; o = pathlib.Path(sys.argv[1]); time.sleep(0.5); "
              "(o / 'results.jsonl').write_text(json.dumps({'label': sys.argv[2], 'seed': int(sys.argv[3]), "
              "'time_s': 0.0, 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')}) + chr(10))")
    monkeypatch.setattr(ParallelCells, "command", lambda self, label, seed, cell_out: [
        sys.executable, "-c", script, str(cell_out), label, str(seed)])
    run_experiment(exp, out, parallel=ParallelCells("x", jobs=4, gpus=["2", "5"]), log=lambda _: None)
    gpus = sorted(json.loads(l)["gpu"] for l in (out / "results.jsonl").read_text().splitlines())
    assert gpus == ["2", "2", "5", "5"]  # 4 cells at once over 2 GPUs: two each
    for bad in (["--gpus", "0,1"], ["--gpus", "a,b", "--parallel", "2"]):
        assert experiment_main([str(tmp_path / "exp.py"), "--out", str(out), *bad]) == 2


def test_interrupted_parallel_run_leaves_no_cell_process(tmp_path, monkeypatch):
    """An error (or Ctrl-C) in the parent terminates the cell processes still running."""
    import os
    pid_file = tmp_path / "b.pid"
    scripts = {"a": "import time; time.sleep(1)",
               "b": (f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); "
                     "time.sleep(60)")}
    monkeypatch.setattr(ParallelCells, "command",
                        lambda self, label, seed, cell_out: [sys.executable, "-c", scripts[label]])

    def on_done(cell, row, run_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ParallelCells("x", jobs=2).run([("a", 0), ("b", 0)], tmp_path, lambda _: {"ok": 1},
                                       on_done, lambda _: None)
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_config_hash_covers_the_settings_not_the_output_dir(tmp_path):
    routing = load_experiment(_write(tmp_path))
    h = lambda exp, label="smk", seed=0, paths=None: config_hash(exp, cell_configs(exp, label, seed, paths))
    assert h(routing) == h(routing) and h(routing) != h(routing, seed=1) != h(routing, "dense")
    longer = {**routing, "overrides": {**routing["overrides"], "train.steps": 5}}
    assert h(longer) != h(routing)
    phases = {"first": ["arithmetic"], "second": ["prose"], "first_steps": 3, "second_steps": 2}
    forgetting = load_experiment(_write(tmp_path, "forgetting", {"smk": {}}, phases=phases))
    paths = lambda d: {p: str(tmp_path / d / f"{p}.jsonl") for p in ("first", "second")}
    assert h(forgetting, paths=paths("a")) == h(forgetting, paths=paths("b"))  # moved output dir
    assert h(forgetting, paths=paths("a")) != h({**forgetting, "phases": {**phases, "second_steps": 3}},
                                                 paths=paths("a"))


def test_config_overrides_and_dry_run(tmp_path, capsys):
    """--config.* reaches every run's config; --dry-run lists the grid and writes nothing; a bad
    override is one line naming the flag, exit 2."""
    exp = load_experiment("configs/experiments/routing.py")
    exp["cli_overrides"] = [("data.batch_size", "4")]
    label = next(iter(exp["runs"]))
    assert run_config(exp, label, 0).data.batch_size == 4
    out = tmp_path / "exp"
    assert experiment_main(["configs/experiments/routing.py", "--out", str(out), "--dry-run",
                            "--config.data.batch_size=4", "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing written" in text and "data.batch_size=4" in text and "train.steps=3" in text
    assert not out.exists()
    assert experiment_main(["configs/experiments/routing.py", "--out", str(out), "--dry-run",
                            "--config.data.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onn-experiment: error: ") and "--config.data.nope: unknown key" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_paired_table_differences_dead_experts_and_imbalance_by_hand():
    """Paired differences are taken seed by seed (the seed's data is shared); SE uses ddof=1."""
    from train.experiment.report import paired_table
    share = lambda e0: [[[e0, 1 - e0 - 0.005, 0.005, 0.0]] * 2]  # 1 layer, 2 domains, 4 experts
    rows = [{"label": "base", "seed": s, "analysis/loss": 2.0 + s, "analysis/avg_k": 2.0,
             "analysis/nmi": [0.1], "analysis/domain_expert_share": share(0.5)} for s in range(3)]
    rows += [{"label": "new", "seed": s, "analysis/loss": 2.0 + s - d, "analysis/avg_k": 1.5,
              "analysis/nmi": [0.3], "analysis/domain_expert_share": share(0.25)}
             for s, d in enumerate([0.10, 0.12, 0.14])]
    lines = paired_table(rows, ["base"]).splitlines()
    assert lines[0].split(" | ")[2] == "Δ vs base"
    new = [c.strip() for c in lines[3].strip("|").split("|")]
    # loss 1.90, 2.88, 3.86: mean 2.88, std (ddof 1) 0.98, SE 0.98 / sqrt(3)
    assert new[1] == "2.880 ± 0.566"
    assert new[2] == "-0.120 ± 0.012*"  # differences 0.10, 0.12, 0.14: SE 0.02 / sqrt(3)
    assert new[3] == "1.50" and new[4] == "2.0" and new[5] == "2.98" and new[6] == "0.30"
    base = [c.strip() for c in lines[2].strip("|").split("|")]
    assert base[2] == "-" and base[4] == "2.0" and base[5] == "2.00"


def test_unit_metrics_avg_k_and_nmi_by_hand():
    """Heads/slots analysis from summed counts: a layer that sends each domain to its own unit
    has NMI 1 and avg_k 1; a layer that uses every unit for every domain has NMI 0, avg_k 2."""
    counts = np.array([[[10, 0], [0, 30]], [[10, 10], [30, 30]]], float)  # [L=2, D=2, U=2]
    sums = {"head_counts": counts, "head_gate_hits": np.array([4.0, 6.0]), "head_gate_count": np.array([8.0, 8.0]),
            "head_target_inactive": np.array([2.0, 0.0]), "head_fallback": np.array([40.0, 0.0])}
    m = unit_metrics("head", sums, np.array([10.0, 30.0]))
    np.testing.assert_allclose(m["analysis/head_layer_avg_k"], [1.0, 2.0])
    assert m["analysis/head_avg_k"] == 1.5
    np.testing.assert_allclose(m["analysis/head_domain_avg_k"], [1.5, 1.5])
    np.testing.assert_allclose(m["analysis/head_nmi"], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(m["analysis/head_gate_acc_unmasked"], [0.5, 0.75])
    np.testing.assert_allclose(m["analysis/head_target_inactive_frac"], [0.25, 0.0])
    np.testing.assert_allclose(m["analysis/head_fallback_frac"], [1.0, 0.0])
    slot = unit_metrics("slot", {"slot_counts": counts[:1]}, np.array([10.0, 30.0]))
    assert slot["analysis/slot_avg_k"] == 1.0 and "analysis/slot_gate_acc_unmasked" not in slot


def test_paired_table_shows_unit_columns_only_when_present():
    from train.experiment.report import paired_table
    row = lambda label, **kw: {"label": label, "seed": 0, "analysis/loss": 2.0, **kw}
    plain = paired_table([row("a"), row("b")], ["a"]).splitlines()[0]
    assert "active heads" not in plain and "params" not in plain
    lines = paired_table([row("a", params=1000), row("b", params=1200, **{"analysis/head_avg_k": 1.25,
                          "analysis/head_nmi": [0.1, 0.4]})], ["a"]).splitlines()
    assert lines[0].endswith("| active heads | max head NMI | params |")
    assert lines[2].endswith("| - | - | 1,000 |") and lines[3].endswith("| 1.25 | 0.40 | 1,200 |")


def test_paired_domain_table_by_hand():
    from train.experiment.report import paired_domain_table
    rows = [{"label": "base", "seed": s, "domains": ["a", "b"], "analysis/domain_loss": [1.0 + s, 2.0]}
            for s in range(3)]
    rows += [{"label": "new", "seed": s, "domains": ["a", "b"], "analysis/domain_loss": [1.0 + s - d, 2.0 + d]}
             for s, d in enumerate([0.1, 0.2, 0.3])]
    lines = paired_domain_table(rows, "base").splitlines()
    assert lines[0] == "| run | a | b |"
    assert lines[2] == "| base | 2.000 ± 0.577 | 2.000 ± 0.000 |"  # 1, 2, 3: SE 1 / sqrt(3)
    assert lines[3] == "| new | -0.200 ± 0.058* | +0.200 ± 0.058* |"  # 0.1 / sqrt(3)
