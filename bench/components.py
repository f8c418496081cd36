"""Phase-2 components for onn-bench's `--component` (issue 15, item 7): each one a change of
the model config, timed against the same mode without it (`none`), in the same process.

  none             the mode as it is (the dense counterpart of every row below)
  heads_surprise   model.heads.router = surprise (top-any gate over the heads, Surprise-trained)
  heads_topk       model.heads.router = topk (MoH-style top_k heads with load balancing)
  embed_slots      model.embed.kind = slots (surprise-gated slot-composed embedding)
  embed_ngram2     model.embed.ngram = 2 (hashed bigram memory with a context gate)
  embed_deep       model.embed.deep = true (DeepEmbed: per-layer, per-token FFN scale)
  output_adaptive  model.output.kind = adaptive, cutoffs (V/16, V/4): adaptive softmax (the
                   frequency order is the identity here; it does not change the cost)

The FLOP formula (and so MFU) of every row counts the phase-1 model only: the gated components
are timed, not counted, so a slower component shows as a lower MFU of the same model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from onn_jax.config import ModelConfig


def _heads(router: str) -> Callable[[ModelConfig], ModelConfig]:
    return lambda m: dataclasses.replace(m, heads=dataclasses.replace(m.heads, router=router))


def _embed(**fields) -> Callable[[ModelConfig], ModelConfig]:
    return lambda m: dataclasses.replace(m, embed=dataclasses.replace(m.embed, **fields))


def _adaptive(m: ModelConfig) -> ModelConfig:
    cutoffs = (max(1, m.vocab_size // 16), max(2, m.vocab_size // 4))
    return dataclasses.replace(m, output=dataclasses.replace(m.output, kind="adaptive", cutoffs=cutoffs))


COMPONENTS: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "none": lambda m: m,
    "heads_surprise": _heads("surprise"),
    "heads_topk": _heads("topk"),
    "embed_slots": _embed(kind="slots"),
    "embed_ngram2": _embed(ngram=2),
    "embed_deep": _embed(deep=True),
    "output_adaptive": _adaptive,
}


def parse_components(text: str) -> list[str]:
    """'none,heads_surprise' -> the names, each checked (ValueError naming the unknown one)."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    for name in names:
        if name not in COMPONENTS:
            raise ValueError(f"--component: unknown component {name!r}; known: {list(COMPONENTS)}")
    return names or ["none"]
