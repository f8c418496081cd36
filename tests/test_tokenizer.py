"""Tokenizers: byte round trip, special ids, the chat template's prompt mask, HF loading."""
import sys

import pytest

from onn_jax.data.tokenizer import ByteTokenizer, HFTokenizer, encode_chat, load_tokenizer

B = ByteTokenizer


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    for text in ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🤖🧠 ok", "a\x00b\n\t",
                 "e\u0301 (combining)", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text


def test_byte_special_ids_documented():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 262
    specials = [tok.pad_id, tok.bos_id, tok.eos_id] + [tok.role_ids(r)[0]
                                                      for r in ("system", "user", "assistant")]
    assert specials == [256, 257, 258, 259, 260, 261]
    assert tok.decode([B.BOS, 104, 105, B.EOS, B.PAD]) == "hi"
    assert tok.decode([B.USER, 104, 105, B.EOS], skip_special=False) == "<|user|>hi<|eos|>"
    with pytest.raises(ValueError, match="262"):
        tok.decode([262])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.role_ids("tool")
    with pytest.raises(ValueError, match="fixed special ids"):
        load_tokenizer("byte", eos_token="</s>")


def test_byte_decode_invalid_utf8_replaces():
    assert ByteTokenizer().decode([0xE6, 0x97]) == "\ufffd"  # cut multi-byte character


def test_encode_chat_masks_prompt_exactly():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
            {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"},
            {"role": "assistant", "content": "ef"}]
    ids, trained = encode_chat(tok, msgs)
    s, a, b, c, d, e, f = map(ord, "sabcdef")
    assert ids == [B.BOS, B.SYSTEM, s, B.EOS, B.USER, a, b, B.EOS, B.ASSISTANT, c, B.EOS,
                   B.USER, d, B.EOS, B.ASSISTANT, e, f, B.EOS]
    trained_positions = [i for i, t in enumerate(trained) if t]
    assert trained_positions == [9, 10, 15, 16, 17]  # assistant contents and their EOS
    ids2, trained2 = encode_chat(tok, msgs[:2], add_generation_prompt=True)
    assert ids2 == [B.BOS, B.SYSTEM, s, B.EOS, B.USER, a, b, B.EOS, B.ASSISTANT]
    assert not any(trained2)


def test_hf_missing_package_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="none.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "none.json")  # a missing file is named first


def _word_level(path, vocab):
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tk.add_special_tokens([t for t in vocab if t.startswith("<")])
    tk.save(str(path))
    return path


def test_hf_tokenizer_json_chatml(tmp_path):
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<|im_start|>": 3, "hello": 4, "world": 5,
             "user": 6, "assistant": 7, "system": 8}
    tok = load_tokenizer(_word_level(tmp_path / "tokenizer.json", vocab))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (9, 1, 2, 2)
    assert tok.encode("hello world") == [4, 5]
    assert tok.decode([4, 5, 2]) == "hello world"
    assert tok.role_ids("user") == [3, 6]
    ids, trained = encode_chat(tok, [{"role": "user", "content": "hello"},
                                     {"role": "assistant", "content": "world"}])
    assert ids == [2, 3, 6, 4, 2, 3, 7, 5, 2]
    assert [i for i, t in enumerate(trained) if t] == [7, 8]


def test_hf_tokenizer_json_special_tokens(tmp_path):
    vocab = {"<unk>": 0, "<eos>": 1, "<|": 2, "|>": 3, "user": 4, "hi": 5}
    path = _word_level(tmp_path / "tok.json", vocab)
    tok = load_tokenizer(path, eos_token="<eos>", pad_token="<unk>")
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (1, 0, 1)
    assert tok.role_ids("user") == tok.encode("<|user|>\n")
    with pytest.raises(ValueError, match="bos_token '<s>' is not in the vocabulary"):
        load_tokenizer(path, bos_token="<s>")
    bare = _word_level(tmp_path / "bare.json", {"<unk>": 0, "hi": 1})
    with pytest.raises(ValueError, match="bare.json: no eos_token found"):
        load_tokenizer(bare)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
