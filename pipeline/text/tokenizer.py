"""BERT-style WordPiece tokenization shared by the data stage, training, evaluation and export.

It cuts text exactly as MediaPipe Tasks' BERT tokenizer does, since apps classify with MediaPipe:
lowercase ASCII letters only (no accent stripping, no Unicode normalization), split on ASCII
whitespace, punctuation and CJK characters, then greedy longest-match WordPiece with "##" suffixes;
sequences are [CLS] tokens... [SEP], truncated, then padded with [PAD] (id 0).
"""
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_text

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] must be id 0
PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
# Raw text is cut to seq_len * CHARS_PER_TOKEN characters before WordPiece so a huge line (a 5 MB
# paste) costs no more than a normal one. 50 characters per token is far above real text (about
# 4-6), so the cut never changes the first seq_len tokens of ordinary input.
CHARS_PER_TOKEN = 50

# MediaPipe's word split (kDefaultDelimRe / kDefaultIncludeDelimRe in mediapipe/tasks/cc/text/
# tokenizers/bert_tokenizer.h), run by the same RE2-based tf_text regex_split: RE2's \s is ASCII
# whitespace only, and delimiters other than whitespace are kept as words.
_KEEP_DELIMITERS = "|".join([
    r"[!-/]", r"[:-@]", r"[\[-`]", r"[{-~]", r"[\p{P}]",  # ASCII symbols and Unicode punctuation
    r"[\x{4E00}-\x{9FFF}]", r"[\x{3400}-\x{4DBF}]", r"[\x{20000}-\x{2A6DF}]", r"[\x{2A700}-\x{2B73F}]",
    r"[\x{2B740}-\x{2B81F}]", r"[\x{2B820}-\x{2CEAF}]", r"[\x{F900}-\x{FAFF}]", r"[\x{2F800}-\x{2FA1F}]",
])
_DELIMITERS = r"\s+|" + _KEEP_DELIMITERS
# keras_nlp gets words already split by split_words(): its own split and normalization (Unicode
# case folding, accent stripping, control characters as spaces) are not what MediaPipe does.
_OPTIONS = dict(lowercase=False, strip_accents=False, split=False)


def split_words(texts):
    """tf: string tensor [batch] -> RaggedTensor [batch, None] of words, as MediaPipe splits them.

    tf.strings.lower without an encoding lowercases A-Z only, like MediaPipe's AsciiStrToLower.
    """
    import tensorflow_text as tf_text  # on first use, as keras_nlp below: importers of the constants skip it

    return tf_text.regex_split(tf.strings.lower(texts), _DELIMITERS, _KEEP_DELIMITERS)


def learn_vocabulary(texts, vocab_size) -> list[str]:
    """Learn a WordPiece vocabulary (reserved tokens first) from a list of texts."""
    import keras_nlp  # here, not above: ~1 s to import, and readers of records and vocabularies need none of it

    if vocab_size < len(RESERVED_TOKENS) + 1:
        raise PipelineError(f"data.vocab_size must be more than {len(RESERVED_TOKENS)}, got {vocab_size}")
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(texts), tf.string)).batch(1024).map(split_words)
    return keras_nlp.tokenizers.compute_word_piece_vocabulary(
        ds, vocab_size, reserved_tokens=list(RESERVED_TOKENS), **_OPTIONS)


def save_vocabulary(vocab, path):
    """Write one token per line (the BERT vocab.txt format MediaPipe reads); atomic."""
    write_text(path, "".join(f"{t}\n" for t in vocab))


def load_vocabulary(path) -> list[str]:
    """Read a vocab.txt written by save_vocabulary and check it has the reserved tokens."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: vocabulary file not found (run the data stage first)")
    # split("\n"), not splitlines(): a token may be a character splitlines treats as a break.
    vocab = path.read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    if not vocab:
        raise PipelineError(f"{path}: vocabulary file is empty")
    _check_vocabulary(vocab, path)
    return vocab


def _check_vocabulary(vocab, where="vocabulary"):
    if vocab[0] != PAD:
        raise PipelineError(f"{where}: first token must be {PAD} (id 0), found {vocab[0]!r}")
    missing = [t for t in RESERVED_TOKENS if t not in vocab]
    if missing:
        raise PipelineError(f"{where}: missing reserved token(s) {', '.join(missing)}")
    if len(set(vocab)) != len(vocab):
        raise PipelineError(f"{where}: duplicate tokens")


def make_tokenizer(vocab):
    """A keras_nlp WordPieceTokenizer (ids, int32) for a vocabulary list or vocab.txt path."""
    import keras_nlp  # as in learn_vocabulary

    if isinstance(vocab, (str, Path)):
        vocab = load_vocabulary(vocab)
    vocab = list(vocab)
    _check_vocabulary(vocab)
    # _allow_python_workflow=False: eager calls run the same TensorFlow ops as tf.data and
    # tf.function (keras_nlp 0.32 otherwise runs a separate pure-Python implementation eagerly).
    return keras_nlp.tokenizers.WordPieceTokenizer(
        vocabulary=vocab, oov_token=UNK, dtype="int32", _allow_python_workflow=False, **_OPTIONS)


# do_not_convert: these are plain tf ops; letting autograph convert keras_nlp's code on the first
# trace costs seconds for nothing.
@tf.autograph.experimental.do_not_convert
def wordpiece_ids(tokenizer, texts, max_chars):
    """tf: string tensor [batch] -> RaggedTensor [batch, None] of wordpiece ids, no [CLS]/[SEP].

    Texts are first cut to `max_chars` characters (see CHARS_PER_TOKEN).
    """
    texts = tf.strings.substr(texts, 0, max_chars, unit="UTF8_CHAR")
    ids = tokenizer.tokenize(split_words(texts))
    if isinstance(ids, list):  # eager call: keras_nlp converts its ragged result to Python lists
        flat = np.array([i for row in ids for i in row], np.int32)
        ids = tf.RaggedTensor.from_row_lengths(flat, np.array([len(row) for row in ids], np.int64))
    return ids


def add_special_tokens(ids, seq_len, cls_id, sep_id):
    """tf: ragged wordpiece ids -> ragged [CLS] ids[:seq_len-2] [SEP] (unpadded)."""
    ids = ids[:, : seq_len - 2]
    n = ids.nrows()
    cls = tf.fill([n, 1], tf.cast(cls_id, ids.dtype))
    sep = tf.fill([n, 1], tf.cast(sep_id, ids.dtype))
    return tf.concat([cls, ids, sep], axis=1)


@tf.autograph.experimental.do_not_convert
def tf_encode(tokenizer, texts, seq_len):
    """tf: string tensor [batch] -> dict of int32 [batch, seq_len] model inputs."""
    ids = wordpiece_ids(tokenizer, texts, seq_len * CHARS_PER_TOKEN)
    ids = add_special_tokens(ids, seq_len, tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP))
    word_ids = tf.cast(ids.to_tensor(default_value=0, shape=[None, seq_len]), tf.int32)
    mask = tf.sequence_mask(ids.row_lengths(), seq_len, dtype=tf.int32)
    return {"input_word_ids": word_ids, "input_mask": mask, "input_type_ids": tf.zeros_like(word_ids)}


_ENCODERS = {}  # (id(tokenizer), seq_len) -> (tokenizer, traced tf_encode): trace once, not per call


def _encoder(tokenizer, seq_len):
    key = (id(tokenizer), seq_len)
    if key not in _ENCODERS:
        fn = tf.function(lambda t: tf_encode(tokenizer, t, seq_len),
                         input_signature=[tf.TensorSpec([None], tf.string)])
        _ENCODERS[key] = (tokenizer, fn)  # holding the tokenizer keeps its id from being reused
    return _ENCODERS[key][1]


def encode(tokenizer_or_vocab, texts, seq_len) -> dict[str, np.ndarray]:
    """Texts -> {"input_word_ids", "input_mask", "input_type_ids"}: int32 arrays [len(texts), seq_len]."""
    if seq_len < 2:
        raise PipelineError(f"sequence length must be at least 2 ([CLS] and [SEP]), got {seq_len}")
    tokenizer = tokenizer_or_vocab
    if isinstance(tokenizer, (str, Path, list, tuple)):
        tokenizer = make_tokenizer(tokenizer)
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not one string")
    texts, fn = list(texts), _encoder(tokenizer, seq_len)
    batches = [fn(tf.constant(texts[i:i + 1024], tf.string)) for i in range(0, len(texts), 1024)]
    return {k: np.concatenate([b[k].numpy() for b in batches]) if batches else np.zeros([0, seq_len], np.int32)
            for k in ("input_word_ids", "input_mask", "input_type_ids")}
