"""Pretrained word vectors: reading them (a GloVe or fastText text file), the vocabulary they extend, the data
stage's table, and a trained model that understands words it never saw in training through them."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import (POSITIVE, ROOT, UNSEEN_NEGATIVE, UNSEEN_POSITIVE, make_toy_dir, make_vectors_file,
                      tiny_overrides)

from pipeline.text import vectors as V
from pipeline.core.errors import PipelineError


def test_read_a_glove_and_a_fasttext_file(tmp_path):
    glove = tmp_path / "g.txt"
    glove.write_text("the 0.5 -1\ngood 2 3e-1\n")
    fasttext = tmp_path / "f.vec"
    fasttext.write_text("2 2\nthe 0.5 -1\ngood 2 3e-1\n")  # header: words, dimensions
    for path in (glove, fasttext):
        words, vecs = V.read_vectors_file(path)
        assert words == ["the", "good"] and vecs.dtype == np.float32
        np.testing.assert_allclose(vecs, [[0.5, -1], [2, 0.3]])


@pytest.mark.parametrize("text, needle", [
    ("the 1 2\ngood 1\n", "g.txt:2: 1 numbers, expected 2"),
    ("the 1 2\ngood one 2\n", "g.txt:2: not a word followed by numbers"),
    ("the\n", "g.txt:1: 0 numbers"),
    ("", "g.txt: no word vectors"),
])
def test_a_bad_vectors_file_names_the_line(tmp_path, text, needle):
    path = tmp_path / "g.txt"
    path.write_text(text)
    with pytest.raises(PipelineError, match=needle):
        V.read_vectors_file(path)
    with pytest.raises(PipelineError, match="missing.txt: word vectors file not found"):
        V.read_vectors_file(str(tmp_path / "missing.txt"))


def test_extend_vocabulary_adds_whole_lower_case_words_in_file_order():
    vocab = ["[PAD]", "[UNK]", "good", "##s"]
    words = ["good", ",", "Great", "fine", "don't", "x2", "nice", "more"]
    assert V.extend_vocabulary(vocab, words, 3) == vocab + ["fine", "x2", "nice"]
    assert V.extend_vocabulary(vocab, words, 0) == vocab


def test_vector_table_has_a_row_per_token_and_zeros_for_pieces_and_reserved():
    vocab = ["[PAD]", "[UNK]", "good", "##good", "bad", "unknown"]
    words, vecs = ["good", "bad", "[UNK]"], np.array([[1.0, 2.0], [-3.0, 0.0], [9.0, 9.0]], np.float32)
    table = V.vector_table(vocab, words, vecs)
    assert table.shape == (6, 2)
    scale = vecs.std()
    np.testing.assert_allclose(table[2], vecs[0] / scale)
    np.testing.assert_allclose(table[4], vecs[1] / scale)
    assert not table[[0, 1, 3, 5]].any()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, root) after data with a vectors file, one epoch of pretraining, and training on the toy task.
    No n-gram term: it knows nothing of unseen words, so the Transformer alone must get them right."""
    from pipeline.core.config import load_config
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.pretrain import run_pretrain_stage
    from pipeline.stages.train import run_train_stage

    root = tmp_path_factory.mktemp("vectors")
    vec = make_vectors_file(root / "vec.txt")
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(root, f"data.word_vectors={vec}", "train.epochs=6",
                                                           "model.ngram_order=0", "pretrain.epochs=1"))
    run_data_stage(cfg, str(make_toy_dir(root)), "toy")
    run_pretrain_stage(cfg, "toy")
    assert run_train_stage(cfg, "toy")["init"] == "pretrained"
    return cfg, root


def test_data_stage_writes_the_vectors_and_a_new_vectors_file_remakes_it(run):
    from pipeline.stages.data import run_data_stage

    cfg, root = run
    processed = root / "data" / "processed" / "toy"
    vocab = (processed / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab[-6:] == UNSEEN_POSITIVE + UNSEEN_NEGATIVE  # the only words of the file not learned already
    assert "Great" not in vocab
    table, seen, learned = V.load_table(processed)
    assert table.shape == (len(vocab), 8) and seen.shape == (len(vocab),) and learned == len(vocab) - 6
    assert not seen[-6:].any() and seen[vocab.index(POSITIVE[0])] and seen[vocab.index("[CLS]")]
    assert table[vocab.index(POSITIVE[0])].any() and not table[vocab.index("[CLS]")].any()
    stats = json.loads((processed / "stats.json").read_text())["word_vectors"]
    assert stats["added_words"] == 6 and stats["dim"] == 8 and stats["unseen_tokens"] == {"dev": 0.0}

    copy = root / "copy"  # other vectors: the stage is not up to date any more
    shutil.copytree(root / "data", copy / "data")
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, data=str(copy / "data")),
                              data=dataclasses.replace(cfg.data, word_vectors=str(make_vectors_file(copy / "v.txt", seed=1))))
    run_data_stage(cfg, str(root / "toy"), "toy")
    assert not np.array_equal(V.load_table(copy / "data" / "processed" / "toy")[0], table)


def test_a_trained_model_understands_words_it_only_knows_from_their_vectors(run):
    from pipeline.measure.predictors import load_predictor

    _, root = run
    texts = [f"the movie was {w}" for w in UNSEEN_POSITIVE + UNSEEN_NEGATIVE]
    probs = load_predictor(root / "saved_models" / "toy").predict_proba(texts)[:, 1]  # label "1": positive
    assert (probs[:3] > 0.8).all() and (probs[3:] < 0.2).all(), probs


def test_pretraining_and_training_keep_the_vectors_and_no_embedding_for_words_without_training_text(run):
    from pipeline.model.build import load_model

    _, root = run
    table, seen, learned = V.load_table(root / "data" / "processed" / "toy")
    for path in ("pretrained/model.keras", "model.keras"):
        layer = load_model(root / "saved_models" / "toy" / path).get_layer("embedding")
        np.testing.assert_array_equal(layer.word_vectors.numpy(), table)
        assert layer.embeddings.shape[0] == learned  # the added words have no embedding, only their vector
    # MLM's random replacement tokens move unseen tokens' rows a little; training zeroes them again
    embedded = layer.embeddings.numpy()
    assert not embedded[~seen[:learned]].any() and embedded[seen[:learned]].all(axis=1).any()
