"""Tests of pipeline/text/tokenizer.py: BERT-style WordPiece with a small vocabulary learned here."""
import numpy as np
import pytest

import pipeline  # noqa: F401  (before TensorFlow: tf.keras must be tf-keras)
import tensorflow as tf

from pipeline.text import tokenizer as T
from pipeline.core.errors import PipelineError

# Every word appears well over 10 times: the WordPiece learner ignores rarer whole words.
CORPUS = ["Hello, World!", "hello world", "the café is open", "a cafe in the world", "你好 world"] * 20


@pytest.fixture(scope="module")
def vocab():
    return T.learn_vocabulary(CORPUS, 200)


@pytest.fixture(scope="module")
def tok(vocab):
    return T.make_tokenizer(vocab)


def tokens(vocab, ids):
    return [vocab[i] for i in ids]


def test_vocabulary_starts_with_reserved_tokens(vocab):
    assert vocab[: len(T.RESERVED_TOKENS)] == T.RESERVED_TOKENS
    assert vocab[0] == "[PAD]"
    assert {"hello", "world", "cafe", "café", ",", "!"} <= set(vocab)
    assert "Hello" not in vocab  # A-Z lowercased; accents kept, as MediaPipe's BERT tokenizer does


def test_encode_known_text(vocab, tok):
    out = T.encode(tok, ["Hello, World!"], 8)
    assert set(out) == {"input_word_ids", "input_mask", "input_type_ids"}
    assert all(v.dtype == np.int32 and v.shape == (1, 8) for v in out.values())
    assert tokens(vocab, out["input_word_ids"][0]) == [
        "[CLS]", "hello", ",", "world", "!", "[SEP]", "[PAD]", "[PAD]"]
    assert out["input_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert not out["input_type_ids"].any()


def test_lowercase_accents_punctuation_and_cjk(vocab, tok):
    # Cut as MediaPipe's BERT tokenizer cuts (apps use it): A-Z lowercased, accents kept.
    ids = T.encode(tok, ["CAFE", "cafe", "café", "CAFÉ", "world!!", "你好"], 8)["input_word_ids"]
    assert (ids[0] == ids[1]).all() and tokens(vocab, ids[1][:3]) == ["[CLS]", "cafe", "[SEP]"]
    assert tokens(vocab, ids[2][:3]) == ["[CLS]", "café", "[SEP]"]
    assert tokens(vocab, ids[3][:3]) == ["[CLS]", "[UNK]", "[SEP]"]  # É is not lowercased
    assert tokens(vocab, ids[4][:5]) == ["[CLS]", "world", "!", "!", "[SEP]"]
    # CJK characters are words of their own, not "##" continuations.
    assert tokens(vocab, ids[5][:4]) == ["[CLS]", "你", "好", "[SEP]"]


def test_unknown_characters_become_unk(vocab, tok):
    ids = T.encode(tok, ["hello ☃"], 6)["input_word_ids"][0]
    assert tokens(vocab, ids[:4]) == ["[CLS]", "hello", "[UNK]", "[SEP]"]


def test_truncation_keeps_sep_and_padding_shapes(vocab, tok):
    out = T.encode(tok, ["hello world " * 20, "hello", ""], 6)
    ids, mask = out["input_word_ids"], out["input_mask"]
    assert ids.shape == mask.shape == (3, 6)
    assert tokens(vocab, ids[0]) == ["[CLS]", "hello", "world", "hello", "world", "[SEP]"]
    assert mask[0].tolist() == [1] * 6
    assert mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert tokens(vocab, ids[2][:2]) == ["[CLS]", "[SEP]"] and mask[2].sum() == 2
    assert T.encode(tok, [], 6)["input_word_ids"].shape == (0, 6)


def test_huge_single_line_is_cut_before_wordpiece(vocab, tok):
    text = "hello " * 1_000_000  # 6 MB
    ids = T.encode(tok, [text], 16)["input_word_ids"][0]
    assert tokens(vocab, ids) == ["[CLS]"] + ["hello"] * 14 + ["[SEP]"]
    # The cut is by characters (not bytes), the same as slicing the Python string.
    cut = T.wordpiece_ids(tok, tf.constant(["é" + text]), 800)
    assert cut.to_list() == T.wordpiece_ids(tok, tf.constant(["é" + text[:799]]), 10**6).to_list()


def test_encode_accepts_tokenizer_vocab_list_or_file(tmp_path, vocab, tok):
    path = tmp_path / "vocab.txt"
    T.save_vocabulary(vocab, path)
    assert T.load_vocabulary(path) == vocab
    texts = ["Hello, World!", "a café"]
    expected = T.encode(tok, texts, 10)["input_word_ids"]
    for source in (vocab, path, str(path)):
        assert (T.encode(source, texts, 10)["input_word_ids"] == expected).all()


def test_eager_graph_and_tf_data_agree(tok):
    """Eager calls, a traced tf.function (encode, export) and tf.data (the data stage) tokenize alike."""
    texts = ["Hello, World!", "the CAFÉ is open 你好", "x" * 500, ""]
    expected = T.encode(tok, texts, 12)
    eager = T.tf_encode(tok, tf.constant(texts), 12)
    mapped = next(iter(tf.data.Dataset.from_tensor_slices(texts).batch(8).map(lambda t: T.tf_encode(tok, t, 12))))
    for k in expected:
        assert (eager[k].numpy() == expected[k]).all() and (mapped[k].numpy() == expected[k]).all(), k


def test_load_vocabulary_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        T.load_vocabulary(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PipelineError, match="empty"):
        T.load_vocabulary(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(PipelineError, match=r"first token must be \[PAD\]"):
        T.load_vocabulary(tmp_path / "bad.txt")
    (tmp_path / "nosep.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(PipelineError, match=r"missing reserved token\(s\) \[SEP\], \[MASK\]"):
        T.load_vocabulary(tmp_path / "nosep.txt")
