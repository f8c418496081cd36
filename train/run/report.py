"""The end-of-run text train() prints: losses, where every output went, the sample generation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from onn_jax.config import Config
from train.common.workdir_check import CHECKPOINT_DIR, CONFIG_FILE


def tensorboard_command(logdir: Path) -> str:
    """How to view the events: the command, and how to install the viewer where it is missing."""
    import importlib.util
    cmd = f"tensorboard --logdir {logdir}"
    if importlib.util.find_spec("tensorboard") is None:
        cmd += "  (viewer not installed: pip install -e '.[tb]' in the repository)"
    return cmd


def report(summary: dict[str, Any], cfg: Config) -> str:
    """The end-of-run text: losses, outputs and the sample generation."""
    w, last = Path(summary["workdir"]), summary["last"]
    lines = [f"trained steps {summary['start_step']} -> {summary['step']}"]
    if summary.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite loss or gradients): {summary['skipped_steps']}")
    if summary["first_loss"] is not None and last.get("train/main_loss") is not None:
        lines.append(f"main loss {summary['first_loss']:.4f} (first log) -> {last['train/main_loss']:.4f}")
    if last.get("eval/main_loss") is not None:
        lines.append(f"eval loss {last['eval/main_loss']:.4f}, eval acc {last.get('eval/main_acc', 0):.3f}")
    lines += [f"  config       {w / CONFIG_FILE}",
              f"  checkpoints  {w / CHECKPOINT_DIR}" + ("" if cfg.checkpoint.enabled else " (disabled)"),
              f"  metrics      {w / 'metrics.jsonl'}",
              f"  tensorboard  {tensorboard_command(w / 'tb')}",
              "  plots        " + (", ".join(Path(p).name for p in summary["plots"]) + f" in {w / 'plots'}"
                                    if summary["plots"] else "(none)"),
              f"sample (greedy): {cfg.train.sample_prompt!r} -> {summary['sample']!r}"]
    return "\n".join(lines)
