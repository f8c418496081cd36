"""metrics.jsonl writing/reading and the PNG dashboards of `onn-plot`."""
import json
import struct

import numpy as np
import pytest

from train.common.metrics_file import read_metrics, to_jsonable
from train.plots.cli import main as plot_main
from train.plots.dashboards import make_dashboards
from train.run.metrics_writer import MetricsWriter, mean_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk; asserts the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def synthetic_rows(n_steps=6, layers=2, experts=4, domains=3, units=False):
    """units: also gated heads' (attn/*, 4 heads) and slot embedding's (embed/*, 16 slots) metrics."""
    rng = np.random.default_rng(0)
    edges = np.logspace(-9, 1, 41)
    for i in range(n_steps):
        step = 1 + 10 * i
        row = {"train/main_loss": 5.0 - 0.5 * i, "train/main_acc": 0.1 * i, "moe/gate_acc": 0.1 * i,
               "moe/avg_k": 2.0 - 0.1 * i, "moe/gate_loss": 1.0, "moe/threshold_mean": 0.5,
               "moe/expert_load": rng.random((layers, experts))}
        if units:
            row.update({"attn/avg_k": 2.0, "attn/gate_acc_informative": 0.3, "attn/gate_loss": 1.0,
                        "attn/head_load": rng.random((layers, 4)), "embed/avg_k": 8.0, "embed/gate_ce": 0.5,
                        "embed/slot_load": rng.random(16), "embed/slots_used": 16.0})
            if i % 2:
                row.update({"eval/attn_avg_k": 2.0, "eval/embed_avg_k": 7.5,
                            "eval/domain_head_load": rng.random((domains, layers, 4)),
                            "eval/domain_slot_load": rng.random((domains, 16)) * [[1], [1], [np.nan]]})
        if i % 2:
            row.update({"eval/main_loss": 5.0 - 0.4 * i, "eval/main_acc": 0.1 * i,
                        "eval/surprise_hist": rng.integers(0, 50, (layers, 40)),
                        "eval/surprise_edges": edges, "eval/surprise_zero_frac": np.full(layers, 0.2),
                        "eval/domain_expert_load": rng.random((domains, layers, experts)),
                        "eval/domain_names": ["a", "b", "c"]})
        yield step, row


def test_to_jsonable():
    assert to_jsonable(np.float32(1.5)) == 1.5 and to_jsonable(np.int32(3)) == 3
    assert to_jsonable(np.array([[1, 2]], np.float32)) == [[1.0, 2.0]]
    assert to_jsonable(np.array([1.0, np.nan])) == [1.0, None] and to_jsonable(float("inf")) is None
    assert to_jsonable(["a", "b"]) == ["a", "b"]


def test_mean_metrics_averages_elementwise():
    got = mean_metrics([{"a": 1.0, "b": np.array([1.0, 3.0])}, {"a": 3.0, "b": np.array([3.0, 5.0])}])
    assert got["a"] == 2.0 and np.array_equal(got["b"], [2.0, 4.0])


def test_writer_rows_and_resume_truncation(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 10, 20, 30):
        w.write(step, {"train/main_loss": np.float32(step), "moe/expert_load": np.ones((1, 2))})
    w.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 10, 20, 30]
    assert rows[0]["moe/expert_load"] == [[1.0, 1.0]] and "time" in rows[0]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # resuming from a checkpoint at step 20 drops the rows after it; a fresh run clears the file
    MetricsWriter(tmp_path, resume_step=21, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 10, 20]
    MetricsWriter(tmp_path, resume_step=0, tensorboard=False).close()
    assert read_metrics(tmp_path) == []


def test_read_metrics_names_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed JSON"):
        read_metrics(tmp_path)


def test_dashboards_are_valid_pngs(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)  # also exercises the TensorBoard histograms
    for step, row in synthetic_rows():
        w.write(step, row)
    w.close()
    paths = make_dashboards(tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        ["loss.png", "gate.png", "expert_load.png", "surprise.png", "domain_routing.png"])
    for p in paths:
        assert p.parent == tmp_path / "plots"
        width, height = png_size(p)
        assert width >= 400 and height >= 250
    assert png_size(tmp_path / "plots" / "expert_load.png")[1] > 300  # two layers stacked


UNIT_PLOTS = ["attn_gate.png", "head_load.png", "domain_heads.png", "embed_gate.png", "slot_load.png",
              "domain_slots.png"]


def test_gated_heads_and_slots_add_their_dashboards(tmp_path):
    """attn/* and embed/* rows add the unit figures (the run without them: the test above)."""
    w = MetricsWriter(tmp_path, tensorboard=True)  # head_load image, slot_load image + histogram
    for step, row in synthetic_rows(units=True):
        w.write(step, row)
    w.close()
    names = [p.name for p in make_dashboards(tmp_path)]
    assert names == ["loss.png", "gate.png", "expert_load.png", "surprise.png", "domain_routing.png", *UNIT_PLOTS]
    assert png_size(tmp_path / "plots" / "head_load.png")[1] > png_size(tmp_path / "plots" / "slot_load.png")[1]


def test_dense_baseline_draws_only_loss(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"train/main_loss": 3.0 / step, "train/main_acc": 0.1})
    w.close()
    assert [p.name for p in make_dashboards(tmp_path)] == ["loss.png"]


def test_onn_plot_cli(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/main_loss": 2.0}) + "\n")
    assert plot_main([str(tmp_path)]) == 0
    assert str(tmp_path / "plots" / "loss.png") in capsys.readouterr().out


def test_onn_plot_tolerates_a_torn_last_line(tmp_path, capsys):
    """A live or killed run: the last row is half written (no newline); it is ignored."""
    full = json.dumps({"step": 1, "train/main_loss": 2.0}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(full + json.dumps({"step": 2, "train/main_loss": 1.5})[:12])
    assert plot_main([str(tmp_path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "plots" / "loss.png").exists()
    # a malformed line that is not the torn tail is still an error
    (tmp_path / "metrics.jsonl").write_text("{oops\n" + full)
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl:1: malformed JSON" in capsys.readouterr().err
