"""Reporting for `onn-experiment`: the markdown results table (mean +- std over seeds) and the
summary plots (matplotlib, Agg backend) of a grid of runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _mean_std(values) -> str:
    """'mean ± std' over seeds; per-layer lists give 'layer0 / layer1 / ...' seed means."""
    v = [np.asarray(x, float) for x in values if x is not None and np.all(np.isfinite(np.asarray(x, float)))]
    if not v:
        return "-"
    if v[0].ndim == 1 and v[0].size > 1:
        return " / ".join(f"{m:.2f}" for m in np.mean(v, axis=0))
    v = [float(np.mean(x)) for x in v]
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table_columns(kind: str) -> list[tuple[str, str]]:
    if kind == "forgetting":
        return [("first domains: loss after phase 1", "forget/first_loss_before"),
                ("after phase 2", "forget/first_loss_after"), ("rise", "forget/rise"),
                ("second domains: loss after phase 1", "forget/second_loss_before"),
                ("after phase 2", "forget/second_loss_after"), ("avg_k", "analysis/avg_k"),
                ("NMI per layer", "analysis/nmi")]
    return [("eval loss", "analysis/loss"), ("avg_k", "analysis/avg_k"), ("avg_k per layer", "analysis/layer_avg_k"),
            ("gate acc (unmasked)", "analysis/gate_acc_unmasked"),
            ("target inactive (unmasked)", "analysis/target_inactive_frac"),
            ("target = expert 0", "analysis/target_expert0"), ("fallback tokens", "analysis/fallback_frac"),
            ("NMI per layer", "analysis/nmi"), ("time (s)", "time_s")]


# Columns shown only when some row has them: gated heads and the slot embedding (phase 2).
UNIT_COLUMNS = [("heads avg_k per layer", "analysis/head_layer_avg_k"), ("head NMI per layer", "analysis/head_nmi"),
                ("head gate acc (unmasked)", "analysis/head_gate_acc_unmasked"),
                ("head target inactive", "analysis/head_target_inactive_frac"),
                ("head fallback tokens", "analysis/head_fallback_frac"),
                ("slots avg_k", "analysis/slot_avg_k"), ("slot NMI", "analysis/slot_nmi"),
                ("slot fallback tokens", "analysis/slot_fallback_frac"), ("params", "params")]


def present_columns(cols: list[tuple[str, str]], rows: list[dict]) -> list[tuple[str, str]]:
    return [c for c in cols if any(r.get(c[1]) is not None for r in rows)]


def markdown_table(exp: dict, rows: list[dict]) -> str:
    """Mean ± std over seeds of each label (a `-` where a metric does not apply)."""
    cols = table_columns(exp["kind"]) + present_columns(UNIT_COLUMNS, rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"`{exp['name']}`: mean ± std over seeds {seeds}; per-layer columns: seed means "
             "of layer 0 / layer 1 / ...", "",
             "| run | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        cell = lambda k: (f"{np.mean([r[k] for r in mine]):,.0f}" if k == "params" and all(k in r for r in mine)
                          else _mean_std([r.get(k) for r in mine]))
        lines.append(f"| {label} | " + " | ".join(cell(k) for _, k in cols) + " |")
    if exp["kind"] == "routing" and rows and "analysis/domain_loss" in rows[0]:
        doms = rows[0]["domains"]
        lines += ["", "Eval loss per domain:", "", "| run | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
        for label in labels:
            mine = [r for r in rows if r["label"] == label]
            lines.append(f"| {label} | " + " | ".join(
                _mean_std([r["analysis/domain_loss"][i] for r in mine]) for i in range(len(doms))) + " |")
    if exp.get("baselines") and exp["kind"] == "routing":
        lines += ["", "Paired by seed (mean ± standard error; * beyond two standard errors):", "",
                  paired_table(rows, exp["baselines"])]
        if "analysis/domain_loss" in rows[0]:
            for b in exp["baselines"]:
                lines += ["", f"Held-out loss per domain, Δ vs {b} paired by seed (mean ± standard error):", "",
                          paired_domain_table(rows, b)]
    return "\n".join(lines)


DEAD_SHARE = 0.01  # an expert with less than 1% of a layer's pairs counts as dead


def expert_shares(row: dict) -> np.ndarray | None:
    """[L, E] share of each expert in a layer's pairs (domain shares averaged over domains)."""
    share = row.get("analysis/domain_expert_share")
    return None if share is None else np.asarray(share, float).mean(axis=1)


def _se(values) -> tuple[float, float]:
    """(mean, standard error) over seeds (SE 0 for a single seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def paired_table(rows: list[dict], baselines: list[str]) -> str:
    """The comparison table: held-out loss (mean ± standard error over seeds), its paired
    difference to each baseline (same seed = same data and held-out split, so the difference is
    taken seed by seed; `*` marks a difference beyond two standard errors), avg_k, dead experts
    (share < 1% of a layer's pairs) and load imbalance (max / mean expert share) per layer, and
    the best layer's expert-domain NMI."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["seed"]): r for r in rows}
    extra = present_columns([("active heads", "analysis/head_avg_k"), ("max head NMI", "analysis/head_nmi"),
                             ("params", "params")], rows)
    head = ["run", "held-out loss", *[f"Δ vs {b}" for b in baselines], "avg_k", "dead experts / layer",
            "imbalance / layer", "max NMI", *[c for c, _ in extra]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label in labels:
        seeds = sorted(s for (lab, s) in by if lab == label)
        loss_mean, loss_se = _se([by[label, s]["analysis/loss"] for s in seeds])
        cells = [label, f"{loss_mean:.3f} ± {loss_se:.3f}"]
        for b in baselines:
            common = [s for s in seeds if (b, s) in by]
            if label == b or not common:
                cells.append("-")
                continue
            d_mean, d_se = _se([by[label, s]["analysis/loss"] - by[b, s]["analysis/loss"] for s in common])
            cells.append(f"{d_mean:+.3f} ± {d_se:.3f}" + ("*" if abs(d_mean) > 2 * d_se > 0 else ""))
        ks = [by[label, s].get("analysis/avg_k") for s in seeds]
        cells.append(f"{np.mean(ks):.2f}" if all(k is not None for k in ks) else "-")
        shares = [expert_shares(by[label, s]) for s in seeds]
        if all(x is not None for x in shares):
            dead = np.mean([(x < DEAD_SHARE).sum(axis=1) for x in shares], axis=0)
            imb = np.mean([x.max(axis=1) / x.mean(axis=1) for x in shares], axis=0)
            cells += [" / ".join(f"{v:.1f}" for v in dead), " / ".join(f"{v:.2f}" for v in imb)]
        else:
            cells += ["-", "-"]
        nmi = [by[label, s].get("analysis/nmi") for s in seeds]
        cells.append(f"{np.mean([max(n) for n in nmi]):.2f}" if all(n for n in nmi) else "-")
        for _, key in extra:
            v = [by[label, s].get(key) for s in seeds]
            if not all(x is not None for x in v):
                cells.append("-")
            elif key == "params":
                cells.append(f"{np.mean(v):,.0f}")
            else:
                cells.append(f"{np.mean([np.max(x) for x in v]):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_domain_table(rows: list[dict], baseline: str) -> str:
    """Per domain: each row's held-out loss minus the baseline's, seed by seed (mean ± standard
    error, `*` beyond two standard errors); the baseline's own line gives its loss (mean ± SE)."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["seed"]): r for r in rows}
    doms = rows[0]["domains"]
    lines = ["| run | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for label in labels:
        seeds = sorted(s for (lab, s) in by if lab == label and (baseline, s) in by)
        if not seeds:
            continue
        cells = []
        for i in range(len(doms)):
            own = [by[label, s]["analysis/domain_loss"][i] for s in seeds]
            if label == baseline:
                m, se = _se(own)
                cells.append(f"{m:.3f} ± {se:.3f}")
                continue
            m, se = _se([o - by[baseline, s]["analysis/domain_loss"][i] for o, s in zip(own, seeds)])
            cells.append(f"{m:+.3f} ± {se:.3f}" + ("*" if abs(m) > 2 * se > 0 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_plots(exp: dict, rows: list[dict], out: Path) -> list[Path]:
    """Bar charts of the table's metrics, training curves, domain x expert shares (seed 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.common.metrics_file import read_metrics
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cols = [c for c in present_columns(table_columns(exp["kind"]) + UNIT_COLUMNS, rows) if c[1] != "time_s"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), squeeze=False)
    for ax, (title, key) in zip(axes[0], cols):
        lows = []
        for i, label in enumerate(labels):
            v = [float(np.mean(r[key])) for r in rows if r["label"] == label and r.get(key) is not None]
            if v:
                ax.bar(i, np.mean(v), yerr=np.std(v) if len(v) > 1 else None, capsize=3)
                lows.append(min(v))
        if "loss" in key and lows:  # losses differ by little: do not start the axis at 0
            ax.set_ylim(bottom=0.97 * min(lows))
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        vector = any(np.ndim(r.get(key)) for r in rows if r.get(key) is not None)
        ax.set_title(title + (" (mean over layers)" if vector else ""), fontsize=8)
    fig.tight_layout()
    written = [plots / "metrics.png"]
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    # Curves from each run's metrics.jsonl (seed-averaged where the steps agree).
    sub = ["first", "second"] if exp["kind"] == "forgetting" else [""]
    keys = [("train/main_loss", "train loss"), ("moe/avg_k", "avg_k"), ("analysis/loss", "held-out loss, all domains")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for label in labels:
            xs, ys, offset = [], [], 0
            for part in sub:
                curves = [[(r["step"], r[key]) for r in read_metrics(out / "runs" / label / f"seed_{s}" / part)
                           if r.get(key) is not None] for s in sorted({r["seed"] for r in rows})]
                curves = [c for c in curves if c]
                if curves:
                    n = min(len(c) for c in curves)
                    xs += [offset + c[0] for c in curves[0][:n]]
                    ys += list(np.mean([[v for _, v in c[:n]] for c in curves], axis=0))
                    offset = xs[-1]
            if xs:
                ax.plot(xs, ys, label=label, marker="." if key.startswith("analysis") else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(plots / "curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    shares = [(r["label"], np.asarray(r["analysis/domain_expert_share"], float)) for r in rows
              if r["seed"] == rows[0]["seed"] and r.get("analysis/domain_expert_share") is not None]
    if shares:
        n_layers = shares[0][1].shape[0]
        fig, axes = plt.subplots(n_layers, len(shares), figsize=(2.6 * len(shares), 2.2 * n_layers), squeeze=False)
        for j, (label, s) in enumerate(shares):
            for l in range(n_layers):
                ax = axes[l][j]
                ax.imshow(s[l], vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_yticks(range(len(rows[0]["domains"])), rows[0]["domains"] if j == 0 else [], fontsize=6)
                ax.set_xticks([])
                ax.set_title(f"{label} L{l}", fontsize=7)
        fig.suptitle("share of each domain's (token, expert) pairs per expert", fontsize=8)
        fig.tight_layout()
        written.append(plots / "domain_expert.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
