"""onn-train's progress bar (tqdm), or one plain line per logged row when the bar is off.

The bar's postfix shows PROGRESS_KEYS of the latest logged row: the routing numbers a collapse
does not inflate (onn_jax.core.routing_metrics), the loss, the latest eval loss and throughput.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Gated heads (model.heads) and slot embedding (model.embed.kind=slots): active units per token and
# the gate accuracy over tokens with a non-constant S row (pooled over layers; absent under top-k).
# A run without them has no attn/* or embed/* metrics, so its bar is unchanged.
UNIT_PROGRESS_KEYS = (("attn/avg_k", "attn_k"), ("attn/gate_acc_informative", "attn_acc_inf"),
                      ("embed/avg_k", "emb_k"), ("embed/gate_acc_informative", "emb_acc_inf"))
# Keys shown in the progress bar (and the plain log line), with their short labels. The routing
# numbers are the ones a collapse does not inflate (onn_jax.core.routing_metrics); the
# original's `moe/gate_acc` stays in metrics.jsonl only. `eval` is the latest eval loss.
PROGRESS_KEYS = (("train/main_loss", "loss"), ("eval/main_loss", "eval"),
                 ("moe/gate_acc_informative", "gate_acc_inf"), ("moe/dead_experts", "dead"),
                 ("moe/load_cv", "load_cv"), ("moe/router_entropy", "H"), ("moe/fallback_share", "fallback"),
                 ("moe/target_inactive", "tgt_inactive"), ("moe/avg_k", "avg_k"),
                 *UNIT_PROGRESS_KEYS,
                 ("train/grad_norm", "gnorm"), ("train/lr", "lr"), ("perf/tokens_per_sec", "tok/s"),
                 ("perf/mfu", "mfu"))


def progress_fields(metrics: Mapping[str, Any], latest_eval: float | None = None) -> dict[str, str]:
    """The bar's labelled values: scalars with 3 decimals (lr in %.1e, tok/s whole), the dead
    experts per layer as a/b/c, and the latest eval loss even on rows without an eval."""
    post = {}
    for key, label in PROGRESS_KEYS:
        v = metrics.get(key)
        if key == "eval/main_loss" and v is None:
            v = latest_eval
        if v is None:
            continue
        if key == "moe/dead_experts" and np.ndim(v) == 1:
            post[label] = "/".join(str(int(x)) for x in np.asarray(v))
        elif np.ndim(v) == 0 and isinstance(np.asarray(v).item(), (int, float)):
            v = float(v)
            post[label] = (f"{v:.3f}" if key == "perf/mfu" else f"{v:.0f}" if key.startswith("perf/")
                           else f"{v:.1e}" if key == "train/lr" else f"{v:.3f}")
    return post


class Progress:
    """tqdm bar over the steps, its postfix showing PROGRESS_KEYS of the latest logged row."""

    def __init__(self, total: int, initial: int, enabled: bool = True, silent: bool = False):
        self._bar, self._silent, self._eval = None, silent, None
        if enabled and not silent:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, metrics: Mapping[str, Any]) -> None:
        """Updates the bar's postfix; with the bar off, prints one plain line per logged row."""
        if isinstance(metrics.get("eval/main_loss"), (int, float)):
            self._eval = float(metrics["eval/main_loss"])
        post = progress_fields(metrics, self._eval)
        if self._bar is not None:
            self._bar.set_postfix(post, refresh=True)
        elif not self._silent and post:
            step = metrics.get("step")
            print((f"step {step}: " if step is not None else "") +
                  " ".join(f"{k}={v}" for k, v in post.items()), flush=True)

    def write(self, text: str) -> None:
        """Prints a line above the bar (or plainly when the bar is off)."""
        if self._bar is not None:
            self._bar.write(text)
        elif not self._silent:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
