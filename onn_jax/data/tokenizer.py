"""Tokenizers and the chat template.

Two tokenizers share one small interface (`encode`, `decode`, `vocab_size`, `pad_id`,
`bos_id`, `eos_id`, `role_ids`):

- `ByteTokenizer` (default, no files, no dependencies): ids 0..255 are the UTF-8 bytes,
  followed by special ids PAD=256, BOS=257, EOS=258, SYSTEM=259, USER=260,
  ASSISTANT=261, so `vocab_size == 262` (set the model's vocab_size to at least this).
- `HFTokenizer`: a local Hugging Face `tokenizer.json`, loaded with the optional
  `tokenizers` package (imported only when used; never downloads anything).

`encode_chat` turns chat messages into token ids plus a per-token flag saying which
tokens are trained on: `BOS, then per message: role marker, content, EOS`. Only the
content and the closing EOS of assistant messages count; the role markers and every
other message form the prompt and are masked from the loss.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence

ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
    """What the data layer and generation need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def role_ids(self, role: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus six special ids; lossless on any unicode text."""

    PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = 256, 257, 258, 259, 260, 261
    SPECIAL_NAMES = {256: "<|pad|>", 257: "<|bos|>", 258: "<|eos|>", 259: "<|system|>",
                     260: "<|user|>", 261: "<|assistant|>"}
    vocab_size = 262
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Bytes to text (invalid UTF-8 becomes U+FFFD). Special ids are dropped, or
        written as `<|name|>` when skip_special is False."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self.SPECIAL_NAMES:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})")
            if not skip_special:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(self.SPECIAL_NAMES[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def role_ids(self, role: str) -> list[int]:
        _check_role(role)
        return [{"system": self.SYSTEM, "user": self.USER, "assistant": self.ASSISTANT}[role]]


_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
_BOS_NAMES = ("<s>", "[CLS]", "<|bos|>", "<bos>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "[SEP]", "<|eos|>", "<eos>", "<|im_end|>", "<|end_of_text|>",
              "<|endoftext|>")


class HFTokenizer:
    """A local Hugging Face `tokenizer.json` (needs the optional `tokenizers` package).

    Special ids are looked up among common names (e.g. `</s>`, `<|endoftext|>`) unless
    given; a missing PAD falls back to EOS (padding is masked anyway), a missing BOS to
    EOS. Role markers use ChatML (`<|im_start|>role\\n`) when the vocabulary has
    `<|im_start|>`, otherwise the text `<|role|>\\n` encoded with the tokenizer.
    """

    def __init__(self, path: str | os.PathLike, pad_token: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):  # checked first: the clearer error when both apply
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            import tokenizers  # optional dependency, imported only here
        except ImportError as e:
            raise ImportError("loading a tokenizer.json needs the `tokenizers` package: "
                              "pip install tokenizers") from e
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special(eos_token, _EOS_NAMES, "eos_token", None)
        self.pad_id = self._special(pad_token, _PAD_NAMES, "pad_token", self.eos_id)
        self.bos_id = self._special(bos_token, _BOS_NAMES, "bos_token", self.eos_id)
        self._im_start = self._tok.token_to_id("<|im_start|>")

    def _special(self, given: str | None, names: tuple[str, ...], what: str,
                 default: int | None) -> int:
        if given is not None:
            i = self._tok.token_to_id(given)
            if i is None:
                raise ValueError(f"{self.path}: {what} {given!r} is not in the vocabulary")
            return i
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        if default is None:
            raise ValueError(f"{self.path}: no {what} found among {list(names)}; pass {what}=")
        return default

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def role_ids(self, role: str) -> list[int]:
        _check_role(role)
        if self._im_start is not None:
            return [self._im_start] + self.encode(f"{role}\n")
        return self.encode(f"<|{role}|>\n")


def load_tokenizer(path: str | os.PathLike | None = None, **special_tokens) -> Tokenizer:
    """The byte tokenizer when path is None or "byte", else a local tokenizer.json."""
    if path is None or path == "byte":
        if special_tokens:
            raise ValueError("the byte tokenizer has fixed special ids; "
                             f"got {sorted(special_tokens)}")
        return ByteTokenizer()
    return HFTokenizer(path, **special_tokens)


def tokenizer_info(name: str, tok) -> dict:
    """What a checkpoint, an export or a shard set records about its tokenizer: name, vocab
    size and a fingerprint (sha256 of the tokenizer file; "byte" for the byte tokenizer)."""
    import hashlib
    fingerprint = "byte"
    if name != "byte":
        with open(name, "rb") as f:
            fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"name": name, "vocab_size": int(tok.vocab_size), "fingerprint": fingerprint}


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {list(ROLES)}")


def encode_chat(tok: Tokenizer, messages: Sequence[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and, per token, whether it is trained on (assistant content + EOS).

    Layout: BOS, then for each message `role_ids(role) + encode(content) + [EOS]`.
    add_generation_prompt appends the assistant role marker (for sampling a reply).
    """
    ids, trained = [tok.bos_id], [False]
    for m in messages:
        role, content = m["role"], m["content"]
        marker, body = tok.role_ids(role), tok.encode(content) + [tok.eos_id]
        ids += marker + body
        trained += [False] * len(marker) + [role == "assistant"] * len(body)
    if add_generation_prompt:
        marker = tok.role_ids("assistant")
        ids += marker
        trained += [False] * len(marker)
    return ids, trained


def prompt_ids(tok: Tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids of a generation prompt: BOS + text (raw: as plain-text records are trained),
    else a user turn + the assistant marker (as chat records are trained)."""
    if raw:
        return [tok.bos_id] + tok.encode(text)
    return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]
