"""Tokenized on-disk shards and a streaming loader over them (`data.source=shards:DIR`).

    write_shards(["book.txt", "chat.jsonl"], tok, "byte", "DIR", seq_len=256)   # onn-tokenize
    ds = ShardDataset("DIR", tok, tokenizer_name="byte")                          # onn-train
    it = ds.train_iter(global_batch=32, seed=0); batch = next(it); saved = it.state()

The writer streams the files record by record (onn_jax.data.records) and packs them exactly as
onn_jax.data.dataset.make_examples does (same held-out split, packing by domain, masks, domain
order), writing each (split, domain) as raw row files of at most `rows_per_shard` rows:

    DIR/meta.json                  written last: its presence marks a complete shard set
    DIR/<split>-<d>-<k>.tokens     int32 [rows, seq_len + 1]
    DIR/<split>-<d>-<k>.flags      uint8 [rows, seq_len + 1]: token trained on (loss_mask = [:, 1:])

The loader reads rows with positioned reads and draws global batches from grain's MapDataset:
`range(N).shuffle(seed).repeat()` (a fresh permutation per epoch, computed per index, so no
O(N) array) batched by `global_batch`; batch k is read directly, so the position is one
integer, saved in checkpoints as {"epoch", "index"} like the in-memory iterator's. Memory
stays flat as the corpus grows (figures: docs/DATA.md).
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np

from onn_jax.data.records import DataError, encode_record, fit_record, iter_records, record_hash
from onn_jax.data.tokenizer import Tokenizer

META_FILE, FORMAT = "meta.json", 1
SPLITS = ("train", "eval")
PREFIX = "shards:"


# ---------------------------------------------------------------- writing


class _RowWriter:
    """Rows of one (split, domain), packed as make_examples does, written in shard files."""

    def __init__(self, out: str, split: str, d: int, width: int, pad_id: int, pack: bool,
                 rows_per_shard: int):
        self.out, self.stem, self.width, self.pad_id = out, f"{split}-{d:03d}", width, pad_id
        self.pack, self.rows_per_shard = pack, rows_per_shard
        self.files: list[dict] = []  # {"file", "rows"}
        self.ids, self.flags, self.fill = [], [], 0  # the row being packed
        self._handles = None

    def add(self, ids: list[int], trained: list[bool]) -> None:
        if self.fill and (not self.pack or self.fill + len(ids) > self.width):
            self._emit()
        self.ids.append(ids)
        self.flags.append(trained)
        self.fill += len(ids)

    def _emit(self) -> None:
        tokens = np.full(self.width, self.pad_id, np.int32)
        flags = np.zeros(self.width, np.uint8)
        tokens[:self.fill] = [t for ids in self.ids for t in ids]
        flags[:self.fill] = [f for fl in self.flags for f in fl]
        if self._handles is None or self.files[-1]["rows"] == self.rows_per_shard:
            self._close_file()
            name = f"{self.stem}-{len(self.files):05d}"
            self.files.append({"file": name, "rows": 0})
            self._handles = tuple(open(os.path.join(self.out, name + ext), "wb")
                                  for ext in (".tokens", ".flags"))
        self._handles[0].write(tokens.tobytes())
        self._handles[1].write(flags.tobytes())
        self.files[-1]["rows"] += 1
        self.ids, self.flags, self.fill = [], [], 0

    def _close_file(self) -> None:
        if self._handles is not None:
            for h in self._handles:
                h.close()
            self._handles = None

    def close(self) -> list[dict]:
        if self.fill:
            self._emit()
        self._close_file()
        return self.files


def _write_pass(paths, tok, out, width, threshold, pack, strict, chunk_chars, rows_per_shard):
    """One pass over the files; returns (domain -> first-seen index, writers, min hash)."""
    writers: dict[tuple[str, str], _RowWriter] = {}
    seen: dict[str, int] = {}
    min_hash = None
    for r in iter_records(paths, chunk_chars):
        h = record_hash(r)
        min_hash = h if min_hash is None else min(min_hash, h)
        split = "eval" if h < threshold else "train"
        d = seen.setdefault(r["domain"], len(seen))
        key = (split, r["domain"])
        if key not in writers:
            writers[key] = _RowWriter(out, split, d, width, tok.pad_id, pack, rows_per_shard)
        for ids, trained in fit_record(*encode_record(tok, r), width, r, strict):
            writers[key].add(ids, trained)
    return seen, writers, min_hash


def write_shards(paths: Sequence[str | os.PathLike], tok: Tokenizer, tokenizer_info: dict,
                 out: str | os.PathLike, seq_len: int, eval_fraction: float = 0.05,
                 pack: bool = True, strict: bool = False, chunk_chars: int = 1000,
                 rows_per_shard: int = 65536) -> dict:
    """Tokenizes `paths` into shard files in the new directory `out`; returns the meta.

    tokenizer_info: what meta.json records about the tokenizer (onn_jax.data.tokenizer.tokenizer_info).
    `out` must not exist or be empty (nothing is overwritten); on error the files written so
    far stay without meta.json, which no loader accepts.
    """
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(out, None, "exists and is not an empty directory; choose a new one")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    os.makedirs(out, exist_ok=True)
    width = seq_len + 1
    args = (paths, tok, out, width)
    seen, writers, min_hash = _write_pass(*args, eval_fraction * 2.0 ** 64, pack, strict,
                                          chunk_chars, rows_per_shard)
    if eval_fraction > 0 and not any(s == "eval" for s, _ in writers) and min_hash is not None:
        for w in writers.values():  # nothing held out: hold out the smallest hash (as split_eval)
            for f in w.close():
                for ext in (".tokens", ".flags"):
                    os.remove(os.path.join(out, f["file"] + ext))
        seen, writers, _ = _write_pass(*args, min_hash + 1, pack, strict, chunk_chars, rows_per_shard)
    domains = sorted(seen)
    splits = {s: [dict(f, domain=d) for d in domains if (s, d) in writers
                  for f in writers[(s, d)].close()] for s in SPLITS}
    if not splits["train"]:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training records")
    meta = {"format": FORMAT, "seq_len": seq_len, "pack": pack, "eval_fraction": eval_fraction,
            "chunk_chars": chunk_chars, "tokenizer": dict(tokenizer_info), "domains": domains,
            "rows": {s: sum(f["rows"] for f in splits[s]) for s in SPLITS}, "splits": splits,
            "sources": [os.path.abspath(os.fspath(p)) for p in paths]}
    tmp = os.path.join(out, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, META_FILE))
    return meta


# ---------------------------------------------------------------- reading


def read_meta(directory: str | os.PathLike) -> dict:
    """meta.json of a complete shard directory; DataError naming the path otherwise."""
    path = os.path.join(os.fspath(directory), META_FILE)
    if not os.path.isdir(directory):
        raise DataError(os.fspath(directory), None, "no such shard directory (make it with onn-tokenize)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(path, None, "missing: not a complete shard directory (an interrupted "
                                    "onn-tokenize?)") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(path, None, f"unknown shard format (expected format {FORMAT})")
    return meta


class ShardRows:
    """Random access to the rows of one split: take(idx) -> tokens, loss_mask, domain.

    Rows are read with one positioned read (os.pread) each, so a batch costs a few small
    reads and the process holds nothing of the files (a memory map would leave the touched
    pages, and the kernel's read-around, mapped in the process: resident memory growing with
    the corpus, though reclaimable)."""

    def __init__(self, directory: str, files: list[dict], width: int, domains: Sequence[str]):
        self.width = width
        self._files, starts, dom = [], [0], []
        for f in files:
            base = os.path.join(directory, f["file"])
            rows = int(f["rows"])
            for ext, dtype in ((".tokens", np.int32), (".flags", np.uint8)):
                want = rows * width * np.dtype(dtype).itemsize
                if not os.path.isfile(base + ext) or os.path.getsize(base + ext) != want:
                    raise DataError(base + ext, None, f"missing or not {want} bytes as meta.json says")
            self._files.append(base)
            starts.append(starts[-1] + rows)
            dom.append(domains.index(f["domain"]))
        self._starts, self._domain = np.asarray(starts, np.int64), np.asarray(dom, np.int32)
        self._fds: dict[tuple[int, str], int] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _read(self, shard: int, ext: str, row: int, dtype) -> np.ndarray:
        fd = self._fds.get((shard, ext))
        if fd is None:
            fd = self._fds[(shard, ext)] = os.open(self._files[shard] + ext, os.O_RDONLY)
        size = self.width * np.dtype(dtype).itemsize
        return np.frombuffer(os.pread(fd, size, row * size), dtype)

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens [n, T+1] int32, loss_mask [n, T] float32, domain [n] int32 of rows idx."""
        idx = np.asarray(idx, np.int64)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        tokens = np.empty((len(idx), self.width), np.int32)
        flags = np.empty((len(idx), self.width), np.uint8)
        for n, (s, i) in enumerate(zip(shard.tolist(), idx.tolist())):
            local = i - int(self._starts[s])
            tokens[n] = self._read(s, ".tokens", local, np.int32)
            flags[n] = self._read(s, ".flags", local, np.uint8)
        return tokens, flags[:, 1:].astype(np.float32), self._domain[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _batch(rows: ShardRows, idx: np.ndarray) -> dict[str, np.ndarray]:
    tokens, loss_mask, domain = rows.take(idx)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask, "domain": domain}


class ShardIterator:
    """Endless global batches of grain's MapDataset over the train rows (see the module doc);
    `state()` = {"epoch", "index"}: the stream position of the next global batch."""

    def __init__(self, rows: ShardRows, global_batch: int, seed: int, process_index: int,
                 process_count: int, state: dict | None):
        import grain  # optional dependency, imported only for shard data

        from onn_jax.data.dataset import _local_rows
        if len(rows) == 0:
            raise ValueError("no training examples")
        self.rows, self.global_batch, self._n = rows, global_batch, len(rows)
        self._local = _local_rows(global_batch, process_index, process_count)
        self._batches = grain.MapDataset.range(self._n).shuffle(seed=seed).repeat(None).batch(global_batch)
        self._k = 0
        if state is not None:
            self.restore(state)

    def state(self) -> dict:
        p = self._k * self.global_batch
        return {"epoch": p // self._n, "index": p % self._n}

    def restore(self, state: dict) -> None:
        import operator
        try:
            epoch, index = operator.index(state["epoch"]), operator.index(state["index"])
            p = epoch * self._n + index
            ok = set(state) == {"epoch", "index"} and epoch >= 0 and 0 <= index < self._n
            ok = ok and p % self.global_batch == 0
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"bad data iterator state {state!r}: expected {{\"epoch\", \"index\"}} at a "
                             f"multiple of the global batch {self.global_batch} in {self._n} rows")
        self._k = p // self.global_batch

    def __iter__(self) -> "ShardIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = np.asarray(self._batches[self._k])[self._local]
        self._k += 1
        return _batch(self.rows, idx)


class ShardDataset:
    """The Dataset interface of onn_jax.data.dataset over a shard directory (train_iter, eval_batches,
    domains, tokenizer, seq_len)."""

    def __init__(self, directory: str | os.PathLike, tok: Tokenizer):
        directory = os.fspath(directory)
        self.meta = meta = read_meta(directory)
        self.tokenizer, self.seq_len = tok, int(meta["seq_len"])
        self.domains = tuple(meta["domains"])
        width = self.seq_len + 1
        self.train = ShardRows(directory, meta["splits"]["train"], width, self.domains)
        self.eval = ShardRows(directory, meta["splits"]["eval"], width, self.domains)

    def train_iter(self, global_batch: int, seed: int = 0, process_index: int = 0,
                   process_count: int = 1, state: dict | None = None) -> ShardIterator:
        return ShardIterator(self.train, global_batch, seed, process_index, process_count, state)

    def eval_batches(self, global_batch: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """One pass in order, the last batch padded (onn_jax.data.dataset.eval_batches over rows on disk)."""
        from onn_jax.data.dataset import eval_batches
        return eval_batches(self.eval, global_batch, self.tokenizer.pad_id, process_index, process_count,
                            batch_fn=_batch)
