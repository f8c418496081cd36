"""The run's sample generation: a greedy continuation of train.sample_prompt, logged during and
after training, with the prompt encoded as the corpus was trained (chat turn or plain text)."""
from __future__ import annotations

from typing import Any

from onn_jax.config import Config
from onn_jax.data.records import is_chat_file
from onn_jax.data.tokenizer import prompt_ids


def sample_as_text(cfg: Config) -> bool:
    """Whether the run's sample prompt is plain text (BOS + prompt) rather than a user turn:
    train.sample_format, where `auto` means the corpus is only plain-text files."""
    fmt = cfg.train.sample_format
    if fmt != "auto":
        return fmt == "text"
    source = cfg.data.source
    if source == "builtin" or source.startswith("shards:"):
        return False
    return not any(is_chat_file(p.strip()) for p in source.split(","))


def sample(params: Any, cfg: Config, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`, encoded as the corpus was trained (sample_as_text); the
    new tokens are clamped to the room model.max_len leaves after the prompt (as onn-generate does)."""
    from onn_jax.nn.generate import generate
    ids = prompt_ids(tok, prompt, raw=sample_as_text(cfg))
    room = cfg.model.max_len - len(ids)
    if room < 1:
        return f"(prompt of {len(ids)} tokens does not fit model.max_len {cfg.model.max_len})"
    out = generate(params, cfg.model, ids, max_new_tokens=min(max_new_tokens, room), temperature=0.0,
                   eos_id=tok.eos_id, vocab_limit=min(tok.vocab_size, cfg.model.vocab_size))
    return tok.decode(out)
