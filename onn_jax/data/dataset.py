"""Data: user files -> records (onn_jax.data.records) -> fixed-length examples -> deterministic batches.

Usage (the training loop):

    records = corpus.build_corpus(seed=0)        # or data.load_records(["chat.jsonl", "book.txt"])
    tok = tokenizer.load_tokenizer(None)         # byte-level; or a path to a tokenizer.json
    ds = data.Dataset(records, tok, seq_len=256, eval_fraction=0.05)
    it = ds.train_iter(global_batch=32, seed=0, process_index=0, process_count=1, state=None)
    batch = next(it); saved = it.state()         # {"epoch": int, "index": int}; resume: state=saved
    for eval_batch in ds.eval_batches(global_batch=32): ...

A batch is a dict of numpy arrays: inputs [B, T] int32, targets [B, T] int32 (inputs shifted
by one), loss_mask [B, T] float32 (1 where the target is trained on: assistant content and
its EOS for chat records, everything after BOS for text records),
domain [B] int32 (index into `ds.domains`; -1 for the padding rows of the last eval batch).
B is this process's share, global_batch / process_count.

Examples are *packed by domain*: records of one domain are laid end to end (each starts
with BOS) into rows of seq_len + 1 tokens, a record never split across rows, the row's
tail padded with PAD (masked). So every row holds one domain and `domain` is exact.
Attention is not blocked between records of a row (the model has no segment ids), as in
the usual packed LM training. pack=False puts one record per row instead. A record longer
than seq_len + 1 tokens first becomes several pieces (onn_jax.data.records.fit_record: a text
record is split into rows that overlap by one token, nothing lost; a chat record is cut to
its start, or raises DataError in strict mode).
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from onn_jax.data.records import (  # DataError: re-exported
    encode_record,
    fit_record,
    iter_chat_jsonl,
    iter_records,
    iter_text,
    record_hash,
)
from onn_jax.data.tokenizer import Tokenizer


def load_chat_jsonl(path: str | os.PathLike, domain: str | None = None) -> list[dict]:
    """Records of a chat jsonl file (see onn_jax.data.records.iter_chat_jsonl)."""
    return list(iter_chat_jsonl(path, domain))


def load_text(path: str | os.PathLike, chunk_chars: int = 1000,
              domain: str | None = None) -> list[dict]:
    """Text records of a plain text file (see onn_jax.data.records.iter_text): chunks of at most
    chunk_chars characters, trained as `BOS text EOS` without chat markers."""
    return list(iter_text(path, chunk_chars, domain))


def load_records(paths: Sequence[str | os.PathLike], chunk_chars: int = 1000) -> list[dict]:
    """Records of several files: `.jsonl` files are chat, anything else plain text."""
    return list(iter_records(paths, chunk_chars))


# ---------------------------------------------------------------- records -> examples

def split_eval(records: Sequence[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval): a record is held out when record_hash / 2**64 < eval_fraction, so
    the split is independent of order and identical records land on the same side. If
    that holds out nothing while eval_fraction > 0, the records of the smallest hash are."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    hashes = [record_hash(r) for r in records]
    threshold = eval_fraction * 2.0 ** 64
    if eval_fraction > 0 and hashes and min(hashes) >= threshold:
        threshold = min(hashes) + 1
    train = [r for r, h in zip(records, hashes) if h >= threshold]
    held = [r for r, h in zip(records, hashes) if h < threshold]
    if not train:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training records")
    return train, held


@dataclass(frozen=True)
class Examples:
    """Fixed-length rows: tokens [N, T+1] int32, loss_mask [N, T] float32, domain [N] int32."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    domain: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def make_examples(records: Sequence[dict], tok: Tokenizer, seq_len: int, domains: Sequence[str],
                  pack: bool = True, strict: bool = False) -> Examples:
    """Encode records (onn_jax.data.records.encode_record) into rows of seq_len + 1 tokens (see module doc).

    loss_mask[n, t] says whether target tokens[n, t + 1] is trained on.
    """
    width = seq_len + 1
    by_domain: dict[str, list[tuple[list[int], list[bool]]]] = {d: [] for d in domains}
    for r in records:
        by_domain[r["domain"]].extend(fit_record(*encode_record(tok, r), width, r, strict))
    rows, flags, row_domain = [], [], []
    for d_id, d in enumerate(domains):
        cur_ids, cur_flags = [], []
        for ids, trained in by_domain[d]:
            if cur_ids and (not pack or len(cur_ids) + len(ids) > width):
                rows.append(cur_ids), flags.append(cur_flags), row_domain.append(d_id)
                cur_ids, cur_flags = [], []
            cur_ids, cur_flags = cur_ids + ids, cur_flags + trained
        if cur_ids:
            rows.append(cur_ids), flags.append(cur_flags), row_domain.append(d_id)
    tokens = np.full((len(rows), width), tok.pad_id, np.int32)
    trained_mask = np.zeros((len(rows), width), np.float32)
    for n, (ids, fl) in enumerate(zip(rows, flags)):
        tokens[n, :len(ids)] = ids
        trained_mask[n, :len(fl)] = fl
    return Examples(tokens, trained_mask[:, 1:], np.asarray(row_domain, np.int32))


# ---------------------------------------------------------------- examples -> batches

def _batch(ex: Examples, idx: np.ndarray) -> dict[str, np.ndarray]:
    tokens = ex.tokens[idx]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": ex.loss_mask[idx], "domain": ex.domain[idx]}


def _local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if not (isinstance(global_batch, int) and global_batch > 0):
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by "
                         f"process_count {process_count}")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


class TrainIterator:
    """Endless batches over the rows of `examples`, reshuffled each epoch.

    Epoch e visits the rows in the order np.random.default_rng([seed, e]).permutation(N);
    global batches are consecutive runs of B rows of that stream, running on into the next
    epoch (nothing dropped). `state()` = {"epoch", "index"}: the stream position of the
    next global batch; this process yields only its rows of each global batch.
    """

    def __init__(self, examples: Examples, global_batch: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, state: dict | None = None):
        if len(examples) == 0:
            raise ValueError("no training examples")
        self.examples, self.global_batch, self.seed = examples, global_batch, seed
        self._rows = _local_rows(global_batch, process_index, process_count)
        self._perm_epoch, self._perm = -1, None
        self.epoch, self.index = 0, 0
        if state is not None:
            self.restore(state)

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict) -> None:
        """Accepts ints or 0-d integer arrays (as a checkpoint library may restore them)."""
        n = len(self.examples)
        try:
            epoch, index = operator.index(state["epoch"]), operator.index(state["index"])
            ok = set(state) == {"epoch", "index"} and epoch >= 0 and 0 <= index < n
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"bad data iterator state {state!r}: expected "
                             f'{{"epoch": int >= 0, "index": int in [0, {n})}}')
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.examples)), epoch
        return self._perm

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        n, parts, need = len(self.examples), [], self.global_batch
        while need:
            take = min(need, n - self.index)
            parts.append(self._order(self.epoch)[self.index:self.index + take])
            need -= take
            self.index += take
            if self.index == n:
                self.epoch, self.index = self.epoch + 1, 0
        idx = np.concatenate(parts)[self._rows]
        return _batch(self.examples, idx)


def eval_batches(examples: Examples, global_batch: int, pad_id: int, process_index: int = 0,
                 process_count: int = 1, batch_fn=None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every row in order; the last global batch is filled with PAD rows
    whose loss_mask is 0 and domain -1, so shapes stay static and each row counts once.
    `batch_fn(examples, idx)` builds a batch of rows idx (default: in-memory Examples;
    onn_jax.data.shards passes its own for rows on disk)."""
    batch_fn = batch_fn or _batch
    rows = _local_rows(global_batch, process_index, process_count)
    n = len(examples)
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)[rows]
        batch = batch_fn(examples, np.minimum(idx, n - 1))
        pad = idx >= n
        batch["inputs"][pad] = pad_id
        batch["targets"][pad] = pad_id
        batch["loss_mask"][pad] = 0.0
        batch["domain"][pad] = -1
        yield batch


class Dataset:
    """Records split into train/eval and encoded; every process must build it identically."""

    def __init__(self, records: Sequence[dict], tok: Tokenizer, seq_len: int,
                 eval_fraction: float = 0.05, pack: bool = True, strict: bool = False):
        if not records:
            raise ValueError("no records: the corpus is empty")
        if not (isinstance(seq_len, int) and seq_len > 0):
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        self.tokenizer, self.seq_len = tok, seq_len
        self.domains = tuple(sorted({r["domain"] for r in records}))
        train, held = split_eval(records, eval_fraction)
        self.train = make_examples(train, tok, seq_len, self.domains, pack, strict)
        self.eval = make_examples(held, tok, seq_len, self.domains, pack, strict)

    def train_iter(self, global_batch: int, seed: int = 0, process_index: int = 0,
                   process_count: int = 1, state: dict | None = None) -> TrainIterator:
        return TrainIterator(self.train, global_batch, seed, process_index, process_count, state)

    def eval_batches(self, global_batch: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        return eval_batches(self.eval, global_batch, self.tokenizer.pad_id, process_index,
                            process_count)
