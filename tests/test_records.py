"""Streamed user files (onn_jax.data.records): the same chunks as a whole-file split, text encoding."""
import random

import pytest

from onn_jax.data import records as rec
from onn_jax.data.tokenizer import ByteTokenizer


def whole_file_chunks(text: str, chunk_chars: int) -> list[tuple[int, str]]:
    """The chunks of a text, restated over the whole string at once (the pre-streaming code)."""
    pieces, line = [], 1
    for para in text.split("\n\n"):
        body = para.strip()
        if body:
            start = line + para[:para.index(body[0])].count("\n")
            pieces += [(start, body[i:i + chunk_chars]) for i in range(0, len(body), chunk_chars)]
        line += para.count("\n") + 2
    chunks = []
    for start, body in pieces:
        if chunks and len(chunks[-1][1]) + 2 + len(body) <= chunk_chars:
            chunks[-1][1] += "\n\n" + body
        else:
            chunks.append([start, body])
    return [tuple(c) for c in chunks]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_streamed_text_equals_whole_file_split(tmp_path, monkeypatch, block):
    rng = random.Random(block)
    text = "".join(rng.choice(["a", "b ", "\n", "\n\n", "\n\n\n", "  ", "é", "ünï"]) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(rec, "READ_BYTES", block)
    got = [(int(r["source"].rsplit(":", 1)[1]), r["text"]) for r in rec.iter_text(path, chunk_chars=37)]
    assert got == whole_file_chunks(text, 37) and len(got) > 20


def test_bad_utf8_names_the_line(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\n\nfine\nbad \xff here\n")
    monkeypatch.setattr(rec, "READ_BYTES", 4)
    with pytest.raises(rec.DataError, match=f"^{path}:4: invalid UTF-8"):
        list(rec.iter_text(path))


def test_text_records_train_as_bos_text_eos_without_chat_markers():
    tok = ByteTokenizer()
    ids, trained = rec.encode_record(tok, {"domain": "d", "text": "hi", "source": "x:1"})
    assert ids == [tok.bos_id, ord("h"), ord("i"), tok.eos_id]
    assert trained == [False, True, True, True]
    chat = {"domain": "d", "messages": [{"role": "assistant", "content": "hi"}]}
    assert rec.encode_record(tok, chat)[0] == [tok.bos_id, tok.ASSISTANT, ord("h"), ord("i"), tok.eos_id]
    assert rec.record_hash({"domain": "d", "text": "hi"}) != rec.record_hash(chat)
