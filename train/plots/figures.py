"""onn-plot's figures of the main loss and the MoE's routing: loss.png, gate.png,
expert_load.png, surprise.png, domain_routing.png (what each shows: train/plots/__init__.py;
onn_jax.core.routing_metrics defines the metrics). Each returns (figure, path), or None when the
run has no such metrics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.plots.draw import domain_heatmap, finish, line, load_heatmap


def plot_loss(rows, out: Path, plt) -> Path | None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = line(a, rows, [("train/main_loss", "train"), ("eval/main_loss", "eval")], "main loss")
    line(b, rows, [("train/main_acc", "train"), ("eval/main_acc", "eval")], "next-token accuracy")
    a.set_title("main loss")
    b.set_title("accuracy")
    return finish(fig, out / "loss.png", plt, drawn)


def plot_gate(rows, out: Path, plt) -> Path | None:
    """Routing health first (numbers a collapse does not inflate), then the gate
    loss and the thresholds, each on its own axes (onn_jax.core.routing_metrics defines them)."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    (acc, dead, cv, ent), (shares, k, loss, theta) = axes
    drawn = line(acc, rows, [("moe/gate_acc_informative", "train, tokens with non-constant S"),
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
    line(cv, rows, [("moe/load_cv", "train"), ("eval/load_cv", "eval")], "std / mean of expert load")
    cv.set_title("load imbalance (coefficient of variation; 0 = balanced)", fontsize=9)
    line(ent, rows, [("moe/router_entropy", "train"), ("eval/router_entropy", "eval")], "nats")
    ent.set_title("router entropy (per-token combine weights)", fontsize=9)
    line(shares, rows, [("moe/fallback_share", "fallback (no expert above threshold)"),
                        ("moe/target_inactive", "hard target argmin S is inactive")], "share of tokens")
    shares.set_title("fallback and inactive-target shares", fontsize=9)
    drawn |= line(k, rows, [("moe/avg_k", "train"), ("eval/avg_k", "eval")], "experts per token")
    k.set_title("avg_k (active experts per token)")
    line(loss, rows, [("moe/gate_loss", "total"), ("moe/gate_ce", "CE to argmin S"), ("moe/gate_kl", "KL")],
         "gate loss (summed over layers)")
    loss.set_title("gate loss")
    line(theta, rows, [("moe/threshold_mean", "mean over experts and layers")], "sigmoid(theta)")
    theta.set_title("expert thresholds sigmoid(theta)")
    return finish(fig, out / "gate.png", plt, drawn)


def plot_expert_load(rows, out: Path, plt) -> Path | None:
    return load_heatmap(rows, out / "expert_load.png", plt, "moe/expert_load", "expert",
                        "expert load: fraction of tokens routed to each expert")


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
    return finish(fig, out / "surprise.png", plt, True)


def plot_domain_routing(rows, out: Path, plt) -> Path | None:
    return domain_heatmap(rows, out / "domain_routing.png", plt, "eval/domain_expert_load", "expert",
                          "share of positions routed")
