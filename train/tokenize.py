"""`onn-tokenize`: tokenize a corpus into on-disk shards for `data.source=shards:DIR`.

    onn-tokenize FILE [FILE ...] --out DIR [--tokenizer byte|tokenizer.json] [--seq-len N]
                 [--eval-fraction F] [--no-pack] [--strict] [--chunk-chars N]

FILEs are chat `.jsonl` files and plain-text files (any other extension); each file's name
is its domain unless a chat record names its own. The corpus is streamed record by record,
so memory does not grow with it. Rows, masks, held-out split and domains are those the
in-memory pipeline makes from the same files (onn_jax.data.shards). Then train with
`onn-train ... --config.data.source=shards:DIR` and the same data.tokenizer and
data.seq_len. Errors (one line naming the flag or file:line) exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="onn-tokenize", description="Tokenize a corpus into shards.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="chat .jsonl or plain-text files")
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory for the shards")
    parser.add_argument("--tokenizer", default="byte", metavar="T", help="byte (default) or a tokenizer.json")
    parser.add_argument("--seq-len", type=int, default=256, metavar="N", help="data.seq_len of the runs (256)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, metavar="F",
                        help="share of records held out, as data.eval_fraction (0.05)")
    parser.add_argument("--no-pack", action="store_true", help="one record per row (data.pack=False)")
    parser.add_argument("--strict", action="store_true", help="a record longer than a row is an error")
    parser.add_argument("--chunk-chars", type=int, default=1000, metavar="N",
                        help="characters per text record (1000, as onn-train)")
    return parser.parse_args(argv)


def check(args) -> str | None:
    """The first bad flag as one line, or None."""
    if args.seq_len < 1:
        return f"--seq-len: must be >= 1, got {args.seq_len}"
    if not 0.0 <= args.eval_fraction < 1.0:
        return f"--eval-fraction: must be in [0, 1), got {args.eval_fraction}"
    if args.chunk_chars < 1:
        return f"--chunk-chars: must be >= 1, got {args.chunk_chars}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bad = check(args)
    if bad:
        print(f"onn-tokenize: error: {bad}", file=sys.stderr)
        return 2
    from onn_jax.data.records import DataError
    from onn_jax.data.shards import write_shards
    from onn_jax.data.tokenizer import load_tokenizer, tokenizer_info
    try:
        tok = load_tokenizer(args.tokenizer)
    except (OSError, ValueError, ImportError) as e:
        print(f"onn-tokenize: error: --tokenizer: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        meta = write_shards(args.files, tok, tokenizer_info(args.tokenizer, tok), args.out, args.seq_len,
                            args.eval_fraction, pack=not args.no_pack, strict=args.strict,
                            chunk_chars=args.chunk_chars)
    except DataError as e:
        print(f"onn-tokenize: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"onn-tokenize: error: --eval-fraction: {e}", file=sys.stderr)
        return 2
    rows = meta["rows"]
    print(f"wrote {rows['train']} train + {rows['eval']} eval rows of {args.seq_len + 1} tokens, "
          f"domains {meta['domains']}, to {args.out} in {time.perf_counter() - t0:.1f} s; train with "
          f"--config.data.source=shards:{args.out} --config.data.seq_len={args.seq_len}"
          + ("" if args.tokenizer == "byte" else f" --config.data.tokenizer={args.tokenizer}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
