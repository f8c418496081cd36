"""Does a checkpoint fit this run? Its tokenizer (vocab size, file fingerprint) and its model config."""
from __future__ import annotations

from typing import Any

from onn_jax.data.tokenizer import tokenizer_info  # noqa: F401  (re-exported: the loop and tools use it here)


def tokenizer_mismatch(saved: dict | None, now: dict, where: str) -> str | None:
    """Why the checkpoint's tokenizer is not this run's (vocab size, fingerprint), or None."""
    if not saved:
        return None
    same_vocab = saved.get("vocab_size") == now["vocab_size"]
    same_file = saved.get("fingerprint", now["fingerprint"]) == now["fingerprint"]
    if not (same_vocab and same_file):
        return (f"data.tokenizer: {where} was trained with tokenizer {saved.get('name')!r} "
                f"(vocab {saved.get('vocab_size')}), but this run uses {now['name']!r} "
                f"(vocab {now['vocab_size']}{'' if same_file else ', another vocabulary'}); "
                "use the checkpoint's tokenizer or a new --workdir")
    return None


def config_diff(saved: Any, now: Any, prefix: str) -> list[str]:
    """`field saved -> now` for every leaf that differs between two config dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now))
                for d in config_diff(saved.get(k), now.get(k), f"{prefix}.{k}")]
    saved, now = _lists(saved), _lists(now)  # a tuple of to_dict is the list of the JSON it was saved as
    return [] if saved == now else [f"{prefix} {_short(saved)} -> {_short(now)}"]


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _short(value: Any, limit: int = 80) -> str:
    """repr of a config value, a long list (e.g. model.output.order) cut to its start and length."""
    text = repr(value)
    if len(text) <= limit or not isinstance(value, (list, tuple)):
        return text
    return text[:limit - 10].rsplit(",", 1)[0] + f", ... ({len(value)} items)]"
