"""Peak memory of onn-tokenize and of the shard loader as the corpus grows (docs/DATA.md).

    python -m bench.shards_memory [--mb 20 200] [--seq-len 256] [--batches 200]

For each size, generates a plain-text corpus of that many MB in a temporary directory
(deleted afterwards), then in fresh processes (peak RSS = ru_maxrss of each): tokenizes it into
shards (byte tokenizer) and draws `batches` shuffled global batches of 32 rows plus one eval pass. Prints one JSON line
per size: corpus bytes, rows, seconds, the peak resident memory (ru_maxrss) of each process,
and the loader's resident memory at the end split into anonymous (its own, not reclaimable)
and file-backed (pages of the memory-mapped shards, page cache the OS may drop at any time).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

WORDS = ("the sea whale ship captain harpoon deck sail wind water long ago never mind how "
         "precisely little money purse nothing particular shore watery part world").split()

TOKENIZE = """
import resource, sys
from train.tokenize import main
assert main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

LOAD = """
import resource, sys, time
from onn_jax.data.shards import ShardDataset
from onn_jax.data.tokenizer import ByteTokenizer
ds = ShardDataset(sys.argv[1], ByteTokenizer())
it = ds.train_iter(global_batch=32, seed=0)
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    next(it)
n_eval = sum(1 for _ in ds.eval_batches(32))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: status[key].split()[0]
print(time.perf_counter() - t, n_eval, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, kib("RssAnon"),
      kib("RssFile"))
"""


def make_corpus(path: str, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target, written = int(mb * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            para = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) + ".\n\n"
            f.write(para)
            written += len(para)
    return written


def child(code: str, *argv: str) -> tuple[list[str], float]:
    """(last stdout line split, seconds) of `python -c code argv...`."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1].split(), time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.shards_memory")
    p.add_argument("--mb", type=float, nargs="+", default=[20, 200])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args(argv)
    for mb in sorted(args.mb):  # ascending: RUSAGE_CHILDREN is a running maximum
        with tempfile.TemporaryDirectory() as tmp:
            corpus = os.path.join(tmp, "corpus.txt")
            nbytes = make_corpus(corpus, mb)
            shards = os.path.join(tmp, "shards")
            (tok_rss,), tok_s = child(TOKENIZE, corpus, "--out", shards, "--seq-len", str(args.seq_len))
            with open(os.path.join(shards, "meta.json")) as f:
                meta = json.load(f)
            (load_s, n_eval, load_self, anon, file_rss), _ = child(LOAD, shards, str(args.batches))
            print(json.dumps({"bench": "shards_memory", "corpus_mb": round(nbytes / 1e6, 1),
                              "seq_len": args.seq_len, "train_rows": meta["rows"]["train"],
                              "eval_rows": meta["rows"]["eval"], "tokenize_s": round(tok_s, 1),
                              "tokenize_peak_rss_mb": round(int(tok_rss) / 1024, 1),
                              "load_batches": args.batches, "eval_batches": int(n_eval),
                              "load_s": round(float(load_s), 2),
                              "load_peak_rss_mb": round(int(load_self) / 1024, 1),
                              "load_end_rss_anon_mb": round(int(anon) / 1024, 1),
                              "load_end_rss_file_mb": round(int(file_rss) / 1024, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
