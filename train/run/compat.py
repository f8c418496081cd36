"""Does a checkpoint fit this run? Its tokenizer (vocab size, file fingerprint) and its config:
which changes a resume refuses, and which it allows freely."""
from __future__ import annotations

from typing import Any

from onn_jax.config import Config, to_dict

RESUME_FREE_DATA_FIELDS = ("strict",)  # data fields that do not change the batch stream
# model/optim fields a resume may change freely (same math, another kernel); any other change
# of model.* or optim.* alters the run's semantics and needs --allow-config-change.
RESUME_FREE_MODEL_FIELDS = ("model.attention",)


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


def semantic_changes(saved_config: dict | None, cfg: Config) -> list[str]:
    """`field saved -> now` for every model/optim field (but RESUME_FREE_MODEL_FIELDS) that
    differs between a checkpoint's config and `cfg`."""
    saved_config = saved_config or {}
    diff = []
    for section in ("model", "optim"):
        saved = saved_config.get(section)
        if saved is None:
            continue
        now = _only_keys_of(to_dict(getattr(cfg, section)), saved)  # fields newer than the run: skip
        diff += [d for d in config_diff(saved, now, section) if d.split()[0] not in RESUME_FREE_MODEL_FIELDS]
    return diff


def _only_keys_of(now: Any, saved: Any) -> Any:
    """`now` restricted to the keys `saved` has (nested dicts)."""
    if isinstance(now, dict) and isinstance(saved, dict):
        return {k: _only_keys_of(now[k], saved[k]) for k in saved if k in now}
    return now
