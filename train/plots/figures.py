"""PNG dashboards from a run's metrics.jsonl: `onn-plot DIR` writes DIR/plots/*.png.

    loss.png         main loss and accuracy, train and held-out eval
    gate.png         routing health (gate accuracy on tokens with non-constant S, dead experts,
                     load imbalance, router entropy, fallback and inactive-target shares),
                     avg_k, gate loss and mean threshold sigmoid(theta), each on its own axes
    expert_load.png  per-layer heatmap: expert x step, share of tokens routed to the expert
    surprise.png     per-layer histogram of Surprise on active (token, expert) pairs, latest eval
    domain_routing.png  per-layer heatmap: domain x expert, share of positions routed, latest eval

Gated attention heads (`attn/*`) and slot embedding (`embed/*`), train/plot_units.py:
    attn_gate.png, embed_gate.png   their routing health, avg_k, gate loss, thresholds
    head_load.png, slot_load.png    per-layer heatmap: head (slot) x step, share of tokens using it
    domain_heads.png, domain_slots.png  domain x head (slot), share of positions, latest eval

Each figure is drawn only when its metrics exist (a dense baseline has no gate). Uses the
Agg backend, so it works without a display. Works on a live or killed run too: a half-written
last line of metrics.jsonl is ignored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PLOTS_DIR = "plots"


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a numeric `key`."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values, np.float64)


def _line(ax, rows, keys_labels, ylabel: str) -> bool:
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


def plot_loss(rows, out: Path, plt) -> Path | None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = _line(a, rows, [("train/main_loss", "train"), ("eval/main_loss", "eval")], "main loss")
    _line(b, rows, [("train/main_acc", "train"), ("eval/main_acc", "eval")], "next-token accuracy")
    a.set_title("main loss")
    b.set_title("accuracy")
    return _save(fig, out / "loss.png", plt, drawn)


def plot_gate(rows, out: Path, plt) -> Path | None:
    """Routing health first (numbers a collapse does not inflate), then the gate
    loss and the thresholds, each on its own axes (onn_jax.core.routing_metrics defines them)."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    (acc, dead, cv, ent), (shares, k, loss, theta) = axes
    drawn = _line(acc, rows, [("moe/gate_acc_informative", "train, tokens with non-constant S"),
                              ("eval/gate_acc_informative", "eval, tokens with non-constant S"),
                              ("moe/gate_acc", "train, all tokens (original metric; inflated by ties)")],
                  "share of tokens: argmax pre == argmin S")
    acc.set_title("gate accuracy")
    pts = [(r["step"], r["moe/dead_experts"]) for r in rows if isinstance(r.get("moe/dead_experts"), list)]
    if pts:
        steps = np.asarray([s for s, _ in pts])
        counts_SxL = np.asarray([v for _, v in pts], np.float64)
        for layer in range(counts_SxL.shape[1]):
            dead.step(steps, counts_SxL[:, layer], where="post", label=f"layer {layer}")
        dead.legend(fontsize=8)
        loads = [r["moe/expert_load"] for r in rows if isinstance(r.get("moe/expert_load"), list)]
        n_experts = np.asarray(loads[-1]).shape[-1] if loads else int(counts_SxL.max()) + 1
        dead.set_ylim(-0.3, n_experts + 0.3)  # whole experts, out of E
    from onn_jax.core.routing_metrics import DEAD_LOAD_FLOOR
    dead.set_xlabel("step")
    dead.set_ylabel("experts")
    dead.grid(alpha=0.3)
    dead.set_title(f"dead experts (load < {DEAD_LOAD_FLOOR:g} of tokens over the log window)", fontsize=9)
    _line(cv, rows, [("moe/load_cv", "train"), ("eval/load_cv", "eval")], "std / mean of expert load")
    cv.set_title("load imbalance (coefficient of variation; 0 = balanced)", fontsize=9)
    _line(ent, rows, [("moe/router_entropy", "train"), ("eval/router_entropy", "eval")], "nats")
    ent.set_title("router entropy (per-token combine weights)", fontsize=9)
    _line(shares, rows, [("moe/fallback_share", "fallback (no expert above threshold)"),
                         ("moe/target_inactive", "hard target argmin S is inactive")], "share of tokens")
    shares.set_title("fallback and inactive-target shares", fontsize=9)
    drawn |= _line(k, rows, [("moe/avg_k", "train"), ("eval/avg_k", "eval")], "experts per token")
    k.set_title("avg_k (active experts per token)")
    _line(loss, rows, [("moe/gate_loss", "total"), ("moe/gate_ce", "CE to argmin S"), ("moe/gate_kl", "KL")],
          "gate loss (summed over layers)")
    loss.set_title("gate loss")
    _line(theta, rows, [("moe/threshold_mean", "mean over experts and layers")], "sigmoid(theta)")
    theta.set_title("expert thresholds sigmoid(theta)")
    return _save(fig, out / "gate.png", plt, drawn)


def plot_expert_load(rows, out: Path, plt) -> Path | None:
    return load_heatmap(rows, out / "expert_load.png", plt, "moe/expert_load", "expert",
                        "expert load: fraction of tokens routed to each expert")


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
    return _save(fig, path, plt, True)


def plot_surprise(rows, out: Path, plt) -> Path | None:
    last = next((r for r in reversed(rows) if isinstance(r.get("eval/surprise_hist"), list)), None)
    if last is None:
        return None
    hist_LxB = np.asarray(last["eval/surprise_hist"], np.float64)
    edges = np.asarray(last["eval/surprise_edges"], np.float64)
    zeros = np.asarray(last.get("eval/surprise_zero_frac", [np.nan] * len(hist_LxB)), np.float64)
    fig, axes = plt.subplots(1, len(hist_LxB), figsize=(5 * len(hist_LxB), 3.8), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        ax.stairs(hist_LxB[layer], edges, fill=True, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("Surprise S = |dL/dY| (active pairs, S > 0)")
        ax.set_ylabel("count")
        ax.set_title(f"layer {layer}, step {last['step']} (S=0 on {zeros[layer]:.0%} of active pairs)",
                     fontsize=9)
    return _save(fig, out / "surprise.png", plt, True)


def plot_domain_routing(rows, out: Path, plt) -> Path | None:
    return domain_heatmap(rows, out / "domain_routing.png", plt, "eval/domain_expert_load", "expert",
                          "share of positions routed")


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
    return _save(fig, path, plt, True)


def _save(fig, path: Path, plt, drawn: bool):
    """(fig, path) to be written once every figure is drawn (so a malformed metric writes
    nothing), or None when the figure has nothing to show."""
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig, path


class PlotError(ValueError):
    """metrics.jsonl or the plots folder cannot be used; the message names the file (and line)."""


def _rows(workdir: Path) -> list[dict[str, Any]]:
    from train.common.metrics_file import read_jsonl
    from train.common.workdir_check import METRICS_FILE
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

    from train.common.workdir_check import _kind_problem

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise PlotError(f"{workdir}: no such directory")
    rows = _rows(workdir)
    out = workdir / PLOTS_DIR
    drawn = []
    try:
        from train.plots.unit_figures import UNIT_PLOTS
        for fn in (plot_loss, plot_gate, plot_expert_load, plot_surprise, plot_domain_routing, *UNIT_PLOTS):
            try:
                figure = fn(rows, out, plt)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                name = fn.__name__.removeprefix("plot_")
                raise PlotError(f"{workdir / 'metrics.jsonl'}: cannot draw {name}.png: malformed metric values "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
            if figure is not None:
                drawn.append(figure)
        problem = (_kind_problem(workdir, want_dir=True) or _kind_problem(out, want_dir=True) or next(
            (p for p in (_kind_problem(path, want_dir=False) for _, path in drawn) if p), None))
        if problem:
            raise PlotError(problem)
        out.mkdir(parents=True, exist_ok=True)
        for fig, path in drawn:
            fig.savefig(path, dpi=100)
    finally:
        plt.close("all")
    return [path for _, path in drawn]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onn-plot", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", help="a training workdir holding metrics.jsonl")
    parser.add_argument("--workdir", dest="workdir_flag", default=None, metavar="DIR", help="the same, as a flag")
    args = parser.parse_args(argv)
    args.workdir = args.workdir_flag or args.workdir
    if args.workdir is None:
        parser.error("give the training workdir: onn-plot DIR (or --workdir DIR)")
    try:
        paths = make_dashboards(args.workdir)
    except PlotError as e:
        print(f"onn-plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing a PNG: disk full, I/O error
        print(f"onn-plot: error: cannot write {e.filename or 'the plots'}: {e.strerror or e}", file=sys.stderr)
        return 4
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
