"""onn-plot's figures for the gated units beyond the MoE: attention heads (`attn/*`, model.heads)
and the slot embedding (`embed/*`, model.embed.kind = slots); docs/FULL_STACK.md defines the
metrics. Each figure is drawn only when the run has its metrics, so a run without gated heads
or slots gets none of them (train/plots/figures.py's set is unchanged).

    attn_gate.png, embed_gate.png     gate accuracy on tokens with non-constant S, avg_k, gate
                                      loss, fallback / inactive-target shares, load imbalance,
                                      router entropy, mean threshold sigmoid(theta) (and slots used)
    head_load.png, slot_load.png      heatmap unit x step: share of tokens using the head (slot)
    domain_heads.png, domain_slots.png  domain x head (slot): share of positions, latest eval
"""
from __future__ import annotations

from pathlib import Path

from train.plots.draw import domain_heatmap, finish, line, load_heatmap

NOUN = {"attn": "heads", "embed": "slots"}


def unit_gate(rows, path: Path, plt, kind: str):
    """Routing health of one unit kind first (numbers a collapse does not inflate), train and eval."""
    p, e, units = f"{kind}/", f"eval/{kind}_", NOUN[kind]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    (acc, k, loss, shares), (cv, ent, theta, used) = axes
    drawn = line(k, rows, [(p + "avg_k", "train"), (e + "avg_k", "eval")], f"{units} per token")
    k.set_title(f"avg_k (active {units} per token)")
    line(acc, rows, [(p + "gate_acc_informative", "train, pooled over layers"),
                     (p + "gate_acc", "train, mean over layers"),
                     (p + "gate_acc_unmasked", "train, mean over layers, unmasked tokens"),
                     (e + "gate_acc_informative", "eval, pooled over layers")],
         "share of tokens: argmax pre == argmin S")
    acc.set_title(f"{kind} gate accuracy (tokens with non-constant S)", fontsize=9)
    line(loss, rows, [(p + "gate_loss", "train"), (p + "gate_ce", "train, CE to argmin S"),
                      (p + "gate_kl", "train, KL"), (p + "gate_lb", "train, load balancing"),
                      (e + "gate_loss", "eval")], "gate loss" + (" (summed over layers)" if kind == "attn" else ""))
    loss.set_title(f"{kind} gate loss (unweighted by w_aux)", fontsize=9)
    line(shares, rows, [(p + "fallback_share", f"fallback (no {units[:-1]} above threshold)"),
                        (p + "target_inactive", "hard target argmin S is inactive"),
                        (e + "fallback_share", "fallback, eval"), (e + "target_inactive", "inactive target, eval")],
         "share of tokens")
    shares.set_title("fallback and inactive-target shares", fontsize=9)
    line(cv, rows, [(p + "load_cv", "train"), (e + "load_cv", "eval")], f"std / mean of {units[:-1]} load")
    cv.set_title("load imbalance (coefficient of variation; 0 = balanced)", fontsize=9)
    line(ent, rows, [(p + "router_entropy", "train"), (e + "router_entropy", "eval")], "nats")
    ent.set_title("router entropy (per-token combine weights)", fontsize=9)
    line(theta, rows, [(p + "threshold_mean", f"mean over {units} (and layers)")], "sigmoid(theta)")
    theta.set_title(f"{kind} thresholds sigmoid(theta)", fontsize=9)
    if kind == "embed":
        line(used, rows, [(p + "slots_used", "train, in the batch"), (e + "slots_used", "eval, in any eval batch")],
             "slots")
        used.set_title("slots active for some token", fontsize=9)
    else:
        used.axis("off")
    return finish(fig, path, plt, drawn)


def plot_attn_gate(rows, out: Path, plt):
    return unit_gate(rows, out / "attn_gate.png", plt, "attn")


def plot_embed_gate(rows, out: Path, plt):
    return unit_gate(rows, out / "embed_gate.png", plt, "embed")


def plot_head_load(rows, out: Path, plt):
    return load_heatmap(rows, out / "head_load.png", plt, "attn/head_load", "head",
                        "head load: fraction of tokens using each attention head")


def plot_slot_load(rows, out: Path, plt):
    return load_heatmap(rows, out / "slot_load.png", plt, "embed/slot_load", "slot",
                        "slot load: fraction of tokens using each embedding slot")


def plot_domain_heads(rows, out: Path, plt):
    return domain_heatmap(rows, out / "domain_heads.png", plt, "eval/domain_head_load", "head",
                          "share of positions using the head")


def plot_domain_slots(rows, out: Path, plt):
    return domain_heatmap(rows, out / "domain_slots.png", plt, "eval/domain_slot_load", "slot",
                          "share of positions using the slot")


UNIT_PLOTS = (plot_attn_gate, plot_head_load, plot_domain_heads, plot_embed_gate, plot_slot_load, plot_domain_slots)
