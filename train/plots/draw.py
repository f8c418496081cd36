"""Drawing helpers every onn-plot figure uses: a metric's series, line panels, the per-layer
heatmaps (unit x step, domain x unit) and a drawn figure set aside until all are drawn.

The figures (train.plots.figures, train.plots.unit_figures) import these; nothing here knows a
particular metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a numeric `key`."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values, np.float64)


def line(ax, rows, keys_labels, ylabel: str) -> bool:
    """Draws the series of each (key, label) on `ax`; True when any of them has points."""
    drawn = False
    for key, label in keys_labels:
        x, y = series(rows, key)
        if x.size:
            ax.plot(x, y, marker="o" if x.size < 20 else None, ms=3, label=label)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def load_heatmap(rows, path: Path, plt, key: str, unit: str, title: str):
    """Per-layer heatmap unit x step of `key` ([L, U] per row, or [U] for one layer)."""
    pts = [(r["step"], np.asarray(r[key], np.float64)) for r in rows if isinstance(r.get(key), list)]
    if not pts:
        return None
    steps = np.asarray([s for s, _ in pts])
    load_SxLxE = np.stack([v.reshape(v.shape[0], -1) if v.ndim == 2 else v[None] for _, v in pts])
    n_layers, n_experts = load_SxLxE.shape[1:]
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.2 + 2.2 * n_layers), squeeze=False)
    vmax = max(float(load_SxLxE.max()), 1e-6)
    # cell edges halfway between logged steps, so uneven logging intervals draw truthfully
    mid = (steps[1:] + steps[:-1]) / 2
    x_edges = np.concatenate([[steps[0] - 0.5], mid, [steps[-1] + 0.5]])
    y_edges = np.arange(n_experts + 1) - 0.5
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.pcolormesh(x_edges, y_edges, load_SxLxE[:, layer, :].T, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_ylabel(unit if pts[0][1].ndim == 1 else f"layer {layer}\n{unit}")
        fig.colorbar(im, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    return finish(fig, path, plt, True)


def domain_heatmap(rows, path: Path, plt, key: str, unit: str, what: str):
    """Per-layer heatmap domain x unit of the latest eval's `key` ([D, L, U], or [D, U])."""
    last = next((r for r in reversed(rows) if isinstance(r.get(key), list)), None)
    if last is None:
        return None
    load_DxLxE = np.asarray(last[key], np.float64)
    load_DxLxE = load_DxLxE[:, None] if load_DxLxE.ndim == 2 else load_DxLxE
    names = last.get("eval/domain_names") or [str(d) for d in range(len(load_DxLxE))]
    empty_D = np.all(np.isnan(load_DxLxE.reshape(len(load_DxLxE), -1)), -1)  # no eval positions
    names = [f"{n} (none)" if e else n for n, e in zip(names, empty_D)]
    n_layers = load_DxLxE.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(2 + 4 * n_layers, 1.5 + 0.5 * len(names)), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(load_DxLxE[:, layer, :], aspect="auto", cmap="viridis", vmin=0.0,
                       interpolation="nearest")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(unit)
        where = f"layer {layer}: " if np.asarray(last[key]).ndim == 3 else ""
        ax.set_title(f"{where}{what} (eval, step {last['step']})", fontsize=9)
        fig.colorbar(im, ax=ax)
    return finish(fig, path, plt, True)


def finish(fig, path: Path, plt, drawn: bool):
    """(fig, path) to be written once every figure is drawn (so a malformed metric writes
    nothing), or None when the figure has nothing to show."""
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig, path
