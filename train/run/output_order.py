"""The adaptive softmax's frequency ranks from the training split (model.output.order).

onn-train calls `with_output_order` at startup, before the workdir is checked or written: with
model.output.kind = adaptive and no order yet, the ids are ranked by how often each is a
trained-on label (loss_mask > 0) in the training split (never the held-out split), ties by id.
The order is then part of the config (config.json, checkpoint metadata, export.json), so a
resume, onn-eval, onn-generate and onn-export read the same clusters without the data.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from onn_jax.nn.output import count_labels, frequency_order

ROWS_PER_READ = 4096  # shard rows counted per read (bounded memory on a corpus on disk)


def training_label_counts(ds, vocab_size: int) -> np.ndarray:
    """counts [V] of the trained-on labels of ds.train (in-memory Examples or ShardRows)."""
    train = ds.train
    if hasattr(train, "tokens"):
        return count_labels(train.tokens[:, 1:], train.loss_mask, vocab_size)
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(train), ROWS_PER_READ):
        tokens, loss_mask, _ = train.take(np.arange(start, min(start + ROWS_PER_READ, len(train))))
        counts += count_labels(tokens[:, 1:], loss_mask, vocab_size)
    return counts


def with_output_order(cfg, ds):
    """cfg with model.output.order counted from ds's training split, where adaptive and unset."""
    out = cfg.model.output
    if out.kind != "adaptive" or out.order:
        return cfg
    order = frequency_order(training_label_counts(ds, cfg.model.vocab_size))
    model = dataclasses.replace(cfg.model, output=dataclasses.replace(out, order=tuple(order.tolist())))
    return dataclasses.replace(cfg, model=model)
