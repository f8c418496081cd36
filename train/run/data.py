"""The run's tokenizer and dataset (cfg.data): the builtin corpus, the user's files or shards.

Errors are TrainError naming the data.* field; onn-eval and onn-experiment build their data here too.
"""
from __future__ import annotations

from onn_jax.config import Config
from onn_jax.data.corpus import build_corpus
from onn_jax.data.dataset import Dataset, load_records
from onn_jax.data.records import DataError
from onn_jax.data.tokenizer import load_tokenizer, tokenizer_info
from train.run.compat import tokenizer_mismatch
from train.run.errors import TrainError


def build_dataset(cfg: Config) -> Dataset:
    """The tokenizer and the train/eval dataset of cfg.data (builtin corpus or user files)."""
    d = cfg.data
    try:
        tok = load_tokenizer(d.tokenizer)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"data.tokenizer: {e}") from e
    if tok.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"model.vocab_size: must be >= the tokenizer's vocab size "
                         f"{tok.vocab_size} ({d.tokenizer}), got {cfg.model.vocab_size}")
    if d.source.startswith("shards:"):
        return open_shards(cfg, tok)
    try:
        if d.source == "builtin":
            records = build_corpus(seed=d.seed, records_per_domain=d.records_per_domain)
        else:
            records = load_records([p.strip() for p in d.source.split(",") if p.strip()])
        return Dataset(records, tok, d.seq_len, d.eval_fraction, pack=d.pack, strict=d.strict)
    except DataError as e:
        raise TrainError(f"data.source: {e}") from e
    except ValueError as e:
        raise TrainError(f"data: {e}") from e


def vocab_from_tokenizer(cfg: Config) -> Config:
    """cfg with model.vocab_size = the tokenizer's size, for a tokenizer.json (onn-train does this
    unless --config.model.vocab_size is given). Unchanged if the tokenizer cannot be loaded
    (build_dataset then reports why) or is the byte tokenizer."""
    import dataclasses
    if cfg.data.tokenizer == "byte":
        return cfg
    try:
        size = load_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError, ImportError):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))


def open_shards(cfg: Config, tok):
    """The ShardDataset of data.source=shards:DIR, checked against cfg.data and the tokenizer."""
    from onn_jax.data.shards import PREFIX, ShardDataset
    d = cfg.data
    try:
        ds = ShardDataset(d.source[len(PREFIX):], tok)
    except (DataError, ValueError) as e:
        raise TrainError(f"data.source: {e}") from e
    meta, where = ds.meta, d.source[len(PREFIX):]
    for field, want in (("seq_len", d.seq_len), ("pack", d.pack), ("eval_fraction", d.eval_fraction)):
        if meta.get(field) != want:
            raise TrainError(f"data.{field}: the shards in {where} were made with {field} {meta.get(field)!r}, "
                             f"this run has {want!r}; set --config.data.{field}={meta.get(field)!r} "
                             "or tokenize again")
    mismatch = tokenizer_mismatch(meta.get("tokenizer"), tokenizer_info(d.tokenizer, tok), f"shards {where}")
    if mismatch:
        raise TrainError(mismatch.replace(" was trained with ", " were made with "))
    return ds
