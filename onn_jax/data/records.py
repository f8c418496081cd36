"""User files -> records, streamed one at a time (memory does not grow with the file).

Two kinds of record:

- chat (`.jsonl`, one `{"messages": [...], "domain"?: str}` per line): `{"domain",
  "messages", "source"}`; encoded with the chat template, only assistant content (and its
  EOS) is trained on (see onn_jax.data.tokenizer.encode_chat).
- text (any other file): paragraphs (split at blank lines) merged into chunks of at most
  chunk_chars characters: `{"domain", "text", "source"}`; encoded as `BOS text EOS` with
  no chat markers and every token after BOS trained on, so `onn-generate --raw` (BOS +
  prompt) continues text exactly as it was trained.

A record longer than a row (seq_len + 1 tokens; see fit_record): a text record is split into
consecutive rows that overlap by one token, so every one of its tokens is still trained on
exactly once; a chat record is cut to its start (or, with strict, refused naming file:line).

A record's domain is its own (chat), else the file name without extension. `source` is
`path:line` for error messages. Bad data raises DataError naming the file and line: malformed
JSON, and any record the JSON reader cannot take (nested too deeply, a line over MAX_LINE_BYTES,
an integer beyond Python's digit limit, text with a lone surrogate).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
from typing import Iterator, Sequence

from onn_jax.data.tokenizer import ROLES, Tokenizer, encode_chat

READ_BYTES = 1 << 20  # text files are read in blocks of this many bytes
MAX_LINE_BYTES = 256 << 20  # a longer .jsonl line is refused (its JSON would need GiBs of memory)


class DataError(ValueError):
    """Bad user data; the message starts with `path:line:` (or `path:` for a whole file)."""

    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.message = path, line, message


def _parse_json(text: str, path: str, line: int):
    """One JSON line; every way the JSON reader can fail (syntax, nesting deeper than Python's
    recursion limit, an integer beyond int's digit limit, memory) is a DataError naming file:line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, line, "JSON nested too deeply for the JSON reader (a record is an object "
                                    'with a "messages" list)') from None
    except MemoryError:
        raise DataError(path, line, f"JSON line of {len(text)} characters is too large for the memory "
                                    "left to the JSON reader") from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise DataError(path, line, f"JSON the reader cannot take: {e}") from None


def _text_problem(value: str) -> str | None:
    """None when `value` can be encoded as UTF-8, else where it cannot (a lone surrogate such as
    \\ud800, which JSON's \\u escapes can spell but no tokenizer can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid text: {value[e.start]!r} at character {e.start} is a lone surrogate "
                "(a \\u escape of half a UTF-16 pair)")
    return None


def _check_chat(obj, path: str, line: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, 'missing or empty "messages" list')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(path, line, f'messages[{j}] must be an object with a string "content"')
        if m.get("role") not in ROLES:
            raise DataError(path, line, f"messages[{j}] has unknown role {m.get('role')!r}; "
                                        f"expected one of {list(ROLES)}")
        problem = _text_problem(m["content"])
        if problem:
            raise DataError(path, line, f"messages[{j}].content {problem}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, line, "no assistant message: nothing to train on")
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise DataError(path, line, f'"domain" must be a string, got {domain!r}')
    problem = _text_problem(domain) if domain is not None else None
    if problem:
        raise DataError(path, line, f'"domain" {problem}')
    return {"domain": domain,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "source": f"{path}:{line}"}


def iter_chat_jsonl(path: str | os.PathLike, domain: str | None = None) -> Iterator[dict]:
    """Records of a chat jsonl file, line by line (blank lines skipped); DataError if none."""
    path = os.fspath(path)
    default = domain or os.path.splitext(os.path.basename(path))[0]
    count, line_no = 0, 0
    with open(path, "rb") as f:
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(path, line_no, f"line longer than {MAX_LINE_BYTES} bytes: too large for one "
                                               "record (the JSON reader would need several times that "
                                               "in memory); split it")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, line_no, f"invalid UTF-8: {e.reason}") from None
            if not text.strip():
                continue
            record = _check_chat(_parse_json(text, path, line_no), path, line_no)
            record["domain"] = record["domain"] or default
            count += 1
            yield record
    if not count:
        raise DataError(path, None, "no records (the file is empty)")


def _paragraphs(path: str) -> Iterator[tuple[int, str]]:
    """(first line, text) of each `\\n\\n`-separated part of a UTF-8 file, read in blocks.

    Equal to splitting the whole text at "\\n\\n": a block's last part is carried over and
    split again with the next block, and a separator found inside a block is one the whole
    text's left-to-right scan finds too."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, line, nbytes_lines = "", 1, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad_line = nbytes_lines + block[:max(e.start, 0)].count(b"\n")
                raise DataError(path, bad_line, f"invalid UTF-8: {e.reason}") from None
            nbytes_lines += block.count(b"\n")
            parts = text.split("\n\n")
            carry = parts.pop() if block else ""
            for para in parts:
                yield line, para
                line += para.count("\n") + 2
            if not block:
                return


def iter_text(path: str | os.PathLike, chunk_chars: int = 1000,
              domain: str | None = None) -> Iterator[dict]:
    """Text records of a plain text file (see the module doc), streamed; DataError if empty."""
    path = os.fspath(path)
    domain = domain or os.path.splitext(os.path.basename(path))[0]
    chunk, count = None, 0  # [first line, text] being merged
    for line, para in _paragraphs(path):
        body = para.strip()
        if not body:
            continue
        start = line + para[:para.index(body[0])].count("\n")
        for i in range(0, len(body), chunk_chars):
            piece = body[i:i + chunk_chars]
            if chunk is not None and len(chunk[1]) + 2 + len(piece) <= chunk_chars:
                chunk[1] += "\n\n" + piece
                continue
            if chunk is not None:
                count += 1
                yield {"domain": domain, "text": chunk[1], "source": f"{path}:{chunk[0]}"}
            chunk = [start, piece]
    if chunk is None:
        raise DataError(path, None, "no text (the file is empty)")
    yield {"domain": domain, "text": chunk[1], "source": f"{path}:{chunk[0]}"}


def is_chat_file(path: str | os.PathLike) -> bool:
    """`.jsonl` files hold chat records; any other file is plain text."""
    return os.fspath(path).endswith(".jsonl")


def iter_records(paths: Sequence[str | os.PathLike], chunk_chars: int = 1000) -> Iterator[dict]:
    """Records of several files in order: `.jsonl` files are chat, anything else plain text."""
    for p in paths:
        if os.path.isdir(p):
            raise DataError(os.fspath(p), None, "is a directory; expected a .jsonl or text file")
        if not os.path.isfile(p):
            raise DataError(os.fspath(p), None, "file not found")
        is_chat = is_chat_file(p)
        try:
            yield from iter_chat_jsonl(p) if is_chat else iter_text(p, chunk_chars)
        except OSError as e:
            raise DataError(os.fspath(p), None, f"cannot read: {e.strerror or e}") from None


def record_hash(record: dict) -> int:
    """A 64-bit hash of a record's domain and content (messages or text; not its source)."""
    body = {"text": record["text"]} if "text" in record else {"messages": record["messages"]}
    key = json.dumps({"domain": record["domain"], **body}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def fit_record(ids: list[int], trained: list[bool], width: int, record: dict,
               strict: bool = False) -> list[tuple[list[int], list[bool]]]:
    """A record's encoding as pieces of at most `width` tokens (rows before packing).

    Text: pieces start every width - 1 tokens; a piece's first token is the previous piece's
    last (the context of its first target) and is not trained again, so the pieces train on
    exactly the tokens the whole record would. Chat: cut to `width` tokens (a later turn would
    lose its prompt), or with `strict` a DataError naming the record's file and line."""
    if len(ids) <= width:
        return [(ids, trained)]
    if "text" in record:
        step = width - 1
        return [(ids[i:i + width], [i == 0 and trained[0]] + trained[i + 1:i + width])
                for i in range(0, len(ids) - 1, step)]
    if strict:
        path, _, line = record.get("source", "<records>:").rpartition(":")
        raise DataError(path or "<records>", int(line) if line.isdigit() else None,
                        f"record has {len(ids)} tokens, more than seq_len + 1 = {width}")
    return [(ids[:width], trained[:width])]


def encode_record(tok: Tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """Token ids of a record and, per token, whether it is trained on (see the module doc)."""
    if "text" in record:
        ids = [tok.bos_id] + tok.encode(record["text"]) + [tok.eos_id]
        return ids, [False] + [True] * (len(ids) - 1)
    return encode_chat(tok, record["messages"])
