"""Tokenizers for language modelling: a character vocabulary learned from train text, or raw UTF-8 bytes.

Both are lossless on text they cover; bits per character compares them (and any other tokenizer). A character
the vocabulary lacks becomes the one unknown id 0 (decoded as U+FFFD), so encoding never fails and every
prompt is accepted.
"""
import collections
import json
from pathlib import Path

UNKNOWN = "\ufffd"


class CharTokenizer:
    """One id per character seen in training text (sorted by code point, after the unknown id 0)."""
    kind = "char"

    def __init__(self, chars):
        self.chars = [UNKNOWN] + [c for c in chars if c != UNKNOWN]
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text, min_count=1):
        """Every character occurring at least min_count times in `text`."""
        counts = collections.Counter(text)
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else UNKNOWN for i in ids)

    def unknown_count(self, text):
        """Characters of `text` that encode to the unknown id."""
        return sum(1 for c in text if c not in self._ids)

    def to_json(self):
        return {"kind": self.kind, "chars": self.chars[1:]}


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, nothing unknown; a character outside ASCII costs several tokens."""
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def unknown_count(self, text):
        return 0

    def to_json(self):
        return {"kind": self.kind}


def save_tokenizer(tokenizer, path):
    Path(path).write_text(json.dumps(tokenizer.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path):
    """A tokenizer written by save_tokenizer."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"])
    if data.get("kind") == "byte":
        return ByteTokenizer()
    raise ValueError(f"{path}: unknown tokenizer kind {data.get('kind')!r}")
