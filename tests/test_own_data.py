"""Your own corpus: onn-tokenizer trains a tokenizer.json, onn-train takes its vocab size, and a
text corpus generates as trained (greedy --raw continuation of a training prefix reproduces it)."""
import ast
import json

import pytest

pytest.importorskip("tokenizers")

from onn_jax.data.tokenizer import HFTokenizer  # noqa: E402
from train.generate import main as generate_main  # noqa: E402
from train.main import main as train_main  # noqa: E402
from train.tokenizer_cli import main as tokenizer_main  # noqa: E402

TEXT = "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea."


def test_tokenizer_cli_trains_a_lossless_bpe(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(TEXT + "\n\n" + "It is a way I have of driving off the spleen.\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    out = tmp_path / "tok.json"
    assert tokenizer_main(["train", "--vocab", "100", str(book), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "onn-tokenizer: error: --vocab: must be >= 260, got 100"
    assert not out.exists()
    assert tokenizer_main(["train", "--vocab", "300", str(book), str(chat), "--out", str(out)]) == 0
    tok = HFTokenizer(out)
    assert tok.vocab_size == 300 and len(tok.encode("Ishmael")) < len("Ishmael")  # merges learnt
    odd = "naïve ☃ 日本 \x00 tabs\tand\nnewlines"  # bytes never seen in training still encode
    assert tok.decode(tok.encode(odd)) == odd
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.role_ids("user")[0] == 3


@pytest.mark.slow
def test_text_corpus_generates_as_trained(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text(TEXT + "\n")
    assert tokenizer_main(["train", "--vocab", "300", str(book), "--out", str(tmp_path / "tok.json")]) == 0
    workdir = tmp_path / "run"
    assert train_main(["--config", "configs/tiny.py", "--workdir", str(workdir),
                       f"--config.data.source={book}", f"--config.data.tokenizer={tmp_path / 'tok.json'}",
                       "--config.data.eval_fraction=0", "--config.train.steps=120", "--config.optim.lr=1e-2",
                       "--config.train.eval_every=0", "--config.checkpoint.every=1000",
                       "--config.train.sample_prompt=Call me", "--config.train.sample_tokens=6",
                       "--config.train.plots=false"]) == 0
    assert json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == 300  # from the tokenizer
    # The run's own sample of a text corpus is a text continuation too (train.sample_format=auto).
    summary = capsys.readouterr().out
    sample = summary.split("sample (greedy): 'Call me' -> ")[1].splitlines()[0]
    assert len(sample) > 2 and TEXT.startswith("Call me" + ast.literal_eval(sample)), summary[-500:]
    assert generate_main(["--workdir", str(workdir), "--raw", "--prompt", "Call me",
                          "--max-new-tokens", "50"]) == 0
    out = capsys.readouterr().out
    assert "Call me" + out.rstrip("\n") == TEXT, out  # to the trained EOS, where it stops
