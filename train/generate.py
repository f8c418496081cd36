"""`onn-generate`: continue a prompt with a trained model (KV-cache sampling).

    onn-generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                 [--top-p P] [--seed S] [--step K] [--raw] [--tokenizer PATH]

DIR is a training workdir (config.json + checkpoints/, the latest checkpoint unless --step;
the model config is the one stored in that checkpoint's metadata, config.json only for a
checkpoint without one) or an export written by `onn-export` (any format, from any path: it
carries its tokenizer). The prompt is sent as a user turn followed by the assistant marker,
as in training's chat format (--raw: BOS + the text, as plain-text corpora are trained).
--tokenizer overrides the run's or export's tokenizer (byte or a tokenizer.json).
temperature 0 (default) is greedy. Prints the continuation; errors exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from train.common.trained_model import ModelLoadError, load_model, quiet_orbax


class GenerateError(RuntimeError):
    """The prompt cannot be continued (tokenizer, prompt length, sampling arguments); the message says why."""


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="onn-generate", description="Sample a continuation from a trained model.")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="training workdir (config.json, checkpoints/) or an onn-export directory")
    parser.add_argument("--prompt", required=True, metavar="TEXT")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass, (0, 1]")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--step", type=int, default=None, metavar="K", help="checkpoint step (default: latest)")
    parser.add_argument("--raw", action="store_true", help="prompt is plain text (BOS + text), not a user turn")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="byte or a tokenizer.json (default: the run's or the export's)")
    return parser.parse_args(argv)


def run(args) -> str:
    from onn_jax.data.tokenizer import load_tokenizer, prompt_ids
    from onn_jax.nn.generate import generate
    params, model_cfg, tok_name, _ = load_model(args.workdir, args.step)
    tok_name = getattr(args, "tokenizer", None) or tok_name
    try:
        tok = load_tokenizer(tok_name)
    except (OSError, ValueError, ImportError) as e:
        raise GenerateError(f"tokenizer {tok_name!r}: {e}") from e
    if tok.vocab_size > model_cfg.vocab_size:
        raise GenerateError(f"tokenizer {tok_name!r} has {tok.vocab_size} ids, more than the model's "
                            f"vocab_size {model_cfg.vocab_size}: not the tokenizer it was trained with")
    ids = prompt_ids(tok, args.prompt, args.raw)
    room = model_cfg.max_len - len(ids)
    if room < 1:
        raise GenerateError(f"the prompt is {len(ids)} tokens; model.max_len {model_cfg.max_len} leaves no room")
    n = args.max_new_tokens
    if isinstance(n, int) and n > room:
        print(f"onn-generate: note: {n} new tokens do not fit model.max_len {model_cfg.max_len} after "
              f"a {len(ids)}-token prompt; generating {room}", file=sys.stderr)
        n = room
    try:
        out = generate(params, model_cfg, ids, max_new_tokens=n, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id,
                       vocab_limit=min(tok.vocab_size, model_cfg.vocab_size))
    except ValueError as e:
        raise GenerateError(str(e)) from e
    text = tok.decode(out)
    if not text:  # say why the line is empty instead of printing it silently
        why = ("the first new token was end-of-sequence" if not out else
               f"the {len(out)} new token(s) decode to no text (special tokens)")
        hint = (" With --raw the prompt is plain text, not the chat turn the model was trained to "
                "answer; leave out --raw, or sample with --temperature > 0." if args.raw else
                " Try --temperature > 0, or a later checkpoint.")
        print(f"onn-generate: note: empty output: {why}.{hint}", file=sys.stderr)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    from train.common.signals import run_program
    return run_program(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from train.common.cli_checks import generate_args
    problem = generate_args(args)  # before the model is loaded
    if problem:
        print(f"onn-generate: error: {problem}", file=sys.stderr)
        return 2
    quiet_orbax()
    try:
        text = run(args)
    except (GenerateError, ModelLoadError) as e:
        print(f"onn-generate: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
