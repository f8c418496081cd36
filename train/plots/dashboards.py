"""The dashboards: every figure of a run's metrics.jsonl drawn, then written to WORKDIR/plots/.

Each figure is drawn only when its metrics exist (a dense baseline has no gate). Uses the Agg
backend, so it works without a display. Works on a live or killed run too: a half-written last
line of metrics.jsonl is ignored. Nothing is written unless every figure could be drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from train.common.metrics_file import read_jsonl
from train.common.workdir_check import METRICS_FILE, PLOTS_DIR, kind_problem
from train.plots.figures import plot_domain_routing, plot_expert_load, plot_gate, plot_loss, plot_surprise
from train.plots.unit_figures import UNIT_PLOTS


class PlotError(ValueError):
    """metrics.jsonl or the plots folder cannot be used; the message names the file (and line)."""


def _rows(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: not a file" if path.exists() else
                        f"{workdir}: no metrics.jsonl to plot (is this a training workdir?)")
    try:  # a live or killed run: last line half written
        numbered = read_jsonl(path, torn_tail_ok=True, numbered=True)
    except ValueError as e:
        raise PlotError(str(e)) from None
    except OSError as e:
        raise PlotError(f"{path}: cannot read it ({e.strerror or e})") from None
    for n, row in numbered:
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise PlotError(f"{path}:{n}: not a metrics row (a JSON object with an integer \"step\")")
    if not numbered:
        raise PlotError(f"{path}: no metrics rows to plot")
    return [row for _, row in numbered]


def make_dashboards(workdir: str | Path) -> list[Path]:
    """Rebuilds WORKDIR/plots/*.png from WORKDIR/metrics.jsonl; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise PlotError(f"{workdir}: no such directory")
    rows = _rows(workdir)
    out = workdir / PLOTS_DIR
    drawn = []
    try:
        for fn in (plot_loss, plot_gate, plot_expert_load, plot_surprise, plot_domain_routing, *UNIT_PLOTS):
            try:
                figure = fn(rows, out, plt)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                name = fn.__name__.removeprefix("plot_")
                raise PlotError(f"{workdir / 'metrics.jsonl'}: cannot draw {name}.png: malformed metric values "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
            if figure is not None:
                drawn.append(figure)
        problem = (kind_problem(workdir, want_dir=True) or kind_problem(out, want_dir=True) or next(
            (p for p in (kind_problem(path, want_dir=False) for _, path in drawn) if p), None))
        if problem:
            raise PlotError(problem)
        out.mkdir(parents=True, exist_ok=True)
        for fig, path in drawn:
            fig.savefig(path, dpi=100)
    finally:
        plt.close("all")
    return [path for _, path in drawn]
