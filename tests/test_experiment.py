"""onn-experiment end to end on a tiny 2-run grid (routing and forgetting), and its errors."""
import json
from pathlib import Path

import pytest

from train import experiment

TINY = {"model.moe.num_experts": 4, "data.records_per_domain": 40, "data.batch_size": 4,
        "data.seq_len": 32, "train.steps": 4, "train.log_every": 2, "train.eval_every": 2,
        "train.eval_batches": 1, "checkpoint.enabled": False}


def _write(tmp_path, kind="routing", runs=None, **extra):
    exp = {"name": "t", "base": str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"), "kind": kind, "overrides": TINY, "seeds": [0],
           "runs": runs or {"smk": {}, "dense": {"model.moe.router": "dense"}}, **extra}
    path = tmp_path / "exp.py"
    path.write_text(f"def get_experiment():\n    return {exp!r}\n")
    return path


@pytest.mark.slow
def test_routing_grid_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert experiment.main([str(_write(tmp_path)), "--out", str(out), "--compile-cache", "none"]) == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r["seed"]) for r in rows] == [("smk", 0), ("dense", 0)]
    smk, dense = rows
    assert len(smk["analysis/nmi"]) == 1 and 0 <= smk["analysis/nmi"][0] <= 1
    assert 1 <= smk["analysis/avg_k"] <= 4 and 0 <= smk["analysis/gate_acc_unmasked"][0] <= 1
    assert len(smk["analysis/domain_loss"]) == 4 and "analysis/avg_k" not in dense
    table = (out / "results.md").read_text()
    assert "| smk |" in table and "| dense |" in table and "Eval loss per domain" in table
    for name in ("metrics.png", "curves.png", "domain_expert.png"):
        assert (out / "plots" / name).stat().st_size > 0
    metrics = [json.loads(l) for l in (out / "runs/smk/seed_0/metrics.jsonl").read_text().splitlines()]
    assert any("analysis/nmi" in m for m in metrics)  # logged at every eval
    # Re-running skips finished cells.
    assert experiment.main([str(_write(tmp_path)), "--out", str(out), "--compile-cache", "none"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert "results:" in capsys.readouterr().out


@pytest.mark.slow
def test_forgetting_continues_the_first_phase_and_measures_the_rise(tmp_path):
    phases = {"first": ["arithmetic"], "second": ["prose"], "first_steps": 3, "second_steps": 2}
    out = tmp_path / "out"
    rc = experiment.main([str(_write(tmp_path, "forgetting", {"smk": {}}, phases=phases)), "--out", str(out),
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
    with pytest.raises(experiment.ExperimentError, match=r"exp.py: runs\['x'\]: unknown config key 'model.moe.nope'"):
        experiment.run_config(experiment.load_experiment(bad), "x", 0)
    with pytest.raises(experiment.ExperimentError, match="kind must be one of"):
        experiment.load_experiment(_write(tmp_path, kind="nope"))
    with pytest.raises(experiment.ExperimentError, match="phases must have"):
        experiment.load_experiment(_write(tmp_path, kind="forgetting"))
    with pytest.raises(experiment.ExperimentError, match="num_experts"):
        experiment.run_config(experiment.load_experiment(_write(tmp_path, runs={"x": {"model.moe.num_experts": 0}})), "x", 0)
    assert experiment.main([str(bad), "--only", "y"]) == 2
    assert "unknown labels ['y']" in capsys.readouterr().err


def test_shipped_experiment_files_load():
    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    routing = experiment.load_experiment(root / "routing.py")
    forgetting = experiment.load_experiment(root / "forgetting.py")
    assert routing["kind"] == "routing" and routing["seeds"] == [0, 1, 2]
    assert {"smk_faithful", "smk_advantage", "smk_learning_cost", "topk_lb", "dense"} <= set(routing["runs"])
    assert forgetting["kind"] == "forgetting" and forgetting["runs"] == routing["runs"]
    assert set(forgetting["phases"]["first"]).isdisjoint(forgetting["phases"]["second"])
    assert Path(routing["base"]).resolve() == (root.parent / "tiny.py").resolve()
