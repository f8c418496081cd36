"""`onn-tokenizer train`: a BPE tokenizer trained on your corpus, written as tokenizer.json.

    onn-tokenizer train --vocab N FILE [FILE ...] [--out tokenizer.json]

Hugging Face `tokenizers` byte-level BPE: the 256 bytes are the base vocabulary, so every
text encodes and decodes losslessly (no unknown token; the byte fallback). Specials:
<|pad|>, <|bos|>, <|eos|> and <|im_start|> (chat role markers `<|im_start|>role\\n`, see
onn_jax.data.tokenizer.HFTokenizer). Chat `.jsonl` files contribute their message contents,
other files their text. Then train with `--config.data.tokenizer=tokenizer.json`: onn-train
sets model.vocab_size to the tokenizer's size unless --config.model.vocab_size is given.
Errors exit with code 2 (one line naming the flag or file:line); nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Sequence

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>"]


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="onn-tokenizer", description="Train a tokenizer on a corpus.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer.json")
    t.add_argument("files", nargs="+", metavar="FILE", help="chat .jsonl or plain-text files")
    t.add_argument("--vocab", type=int, required=True, metavar="N",
                   help=f"vocabulary size (>= {256 + len(SPECIALS)}: bytes + specials)")
    t.add_argument("--out", default="tokenizer.json", metavar="FILE", help="output (default tokenizer.json)")
    return parser.parse_args(argv)


def texts(paths: Sequence[str]) -> Iterator[str]:
    """The trainable text of the files (message contents of chat records), streamed."""
    from onn_jax.data.records import iter_records
    for r in iter_records(paths):
        if "text" in r:
            yield r["text"]
        else:
            yield from (m["content"] for m in r["messages"])


def train_tokenizer(paths: Sequence[str], vocab: int):
    """A trained tokenizers.Tokenizer (byte-level BPE with the SPECIALS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(paths), trainer=trainer)
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.vocab < 256 + len(SPECIALS):
        print(f"onn-tokenizer: error: --vocab: must be >= {256 + len(SPECIALS)}, got {args.vocab}",
              file=sys.stderr)
        return 2
    if os.path.isdir(args.out):
        print(f"onn-tokenizer: error: --out {args.out}: is a directory; give a file name", file=sys.stderr)
        return 2
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("onn-tokenizer: error: needs the `tokenizers` package: pip install 'onn-jax[data]'",
              file=sys.stderr)
        return 2
    from onn_jax.data.records import DataError
    try:
        tok = train_tokenizer(args.files, args.vocab)
    except DataError as e:
        print(f"onn-tokenizer: error: {e}", file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"
    tok.save(tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: byte-level BPE, vocab {tok.get_vocab_size()}; train with "
          f"--config.data.tokenizer={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
