"""Pretrained word vectors: what a word means to a model that never saw it in training.

The data stage adds the most frequent words that have a vector to the learned WordPiece vocabulary and writes
word_vectors.npz beside vocab.txt: one fixed vector per token (zeros for a token without one), whether the token
occurs in train or the unlabelled texts, and the learned vocabulary's size. The embedding layer adds each token's
vector, through a trained projection, to its trained embedding; only learned tokens have one, and those that no
training text has keep it at zero, so for them and for the added words the vector alone speaks. Most new
sentences have such words.
"""
import re
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

FILE_NAME = "word_vectors.npz"
_WORD = re.compile(r"[a-z0-9]+")  # a word MediaPipe's tokenizer keeps whole (no punctuation, no upper case)


def read_vectors_file(path) -> tuple[list[str], np.ndarray]:
    """(words, float32 [n, dim]) of a `word v1 ... vdim` text file, most frequent word first (GloVe's .txt;
    fastText's .vec header is skipped); a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: word vectors file not found (data.word_vectors: a GloVe .txt or fastText "
                            ".vec file, or none)")
    words, rows, dim = [], [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # fastText's "<words> <dim>" header
            try:
                row = [float(v) for v in parts[1:]]
            except ValueError:
                raise PipelineError(f"{path}:{line_no}: not a word followed by numbers") from None
            if dim is None:
                dim = len(row)
            if not row or len(row) != dim:
                raise PipelineError(f"{path}:{line_no}: {len(row)} numbers, expected {dim or 'at least 1'}")
            words.append(parts[0])
            rows.append(row)
    if not words:
        raise PipelineError(f"{path}: no word vectors in the file")
    return words, np.array(rows, np.float32)


def extend_vocabulary(vocab, words, n) -> list[str]:
    """vocab plus the first n of `words` (most frequent first) that are one lower-case word to MediaPipe's
    tokenizer and not yet tokens; WordPiece's longest match then keeps each of them whole."""
    have, extra = set(vocab), []
    for w in words:
        if len(extra) >= n:
            break
        if _WORD.fullmatch(w) and w not in have:
            extra.append(w)
            have.add(w)
    return list(vocab) + extra


def vector_table(vocab, words, vectors) -> np.ndarray:
    """float32 [len(vocab), dim]: each whole-word token's vector (zeros for "##" pieces, reserved tokens and
    words without one), scaled so the file's values have unit standard deviation."""
    index = {w: i for i, w in enumerate(words)}
    table = np.zeros((len(vocab), vectors.shape[1]), np.float32)
    for t, token in enumerate(vocab):
        i = index.get(token)
        if i is not None and not token.startswith("[") and not token.startswith("##"):
            table[t] = vectors[i]
    return table / max(float(vectors.std()), 1e-12)


def save_word_vectors(path, table, seen, learned):
    """Write the vector table, the seen-in-training-texts mask (one row / entry per token) and the size of the
    learned vocabulary (the tokens before the added words)."""
    with open(path, "wb") as f:
        np.savez(f, vectors=table.astype(np.float32), seen=np.asarray(seen, bool), learned=np.int64(learned))


def load_table(processed) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(vectors [V, dim], seen [V] bool, learned) of a processed run, or None when it was made without vectors."""
    path = Path(processed) / FILE_NAME
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["vectors"], z["seen"], int(z["learned"])


def model_sizes(table) -> dict:
    """build_model's vector_dim and embedded_tokens for a load_table result (none: no vectors)."""
    return {} if table is None else {"vector_dim": int(table[0].shape[1]), "embedded_tokens": table[2]}
