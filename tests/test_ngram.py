"""The bag-of-n-grams term: NumPy features = scikit-learn's TF-IDF, the in-graph layer = the NumPy twin,
and a model carrying fitted n-gram weights survives saving and TFLite conversion."""
import numpy as np
import pytest

import pipeline  # noqa: F401  (before TensorFlow: tf.keras must be tf-keras)
import tensorflow as tf

from pipeline.model import build, layers, spec
from pipeline.model import ngram
from pipeline.core.config import ModelConfig

V, C, BUCKETS = 40, 3, 64


def _padded(seed=0, n=8, length=12):
    """Random ids in [1, 8) (many repeats, so counts > 1) with varied real lengths, [PAD]=0 after."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 8, (n, length))
    mask = np.zeros_like(ids)
    for i, real in enumerate(rng.integers(1, length + 1, n)):
        mask[i, :real] = 1
    ids[mask == 0] = 0
    return ids.astype(np.int32), mask.astype(np.int32)


def _random_weights(order, seed=1, idf_range=(1.0, 3.0)):
    rng = np.random.default_rng(seed)
    rows = ngram.num_rows(V, order, BUCKETS)
    idf = rng.uniform(*idf_range, rows).astype(np.float32)  # a fitted idf is >= 1
    idf[rng.random(rows) < 0.3] = 0.0  # unseen rows: idf 0 and no weight
    table = rng.normal(size=(rows, C)).astype(np.float32) * (idf > 0)[:, None]
    return table, idf, rng.normal(size=C).astype(np.float32)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_layer_matches_numpy_reference(order):
    ids, mask = _padded()
    table, idf, bias = _random_weights(order)
    layer = layers.NgramLogits(V, C, order, BUCKETS)
    layer([tf.constant(ids), tf.constant(mask)])
    layer.set_weights([table, idf, bias])
    got = layer([tf.constant(ids), tf.constant(mask)]).numpy()
    want = ngram.ngram_logits(ids, mask, table, idf, bias, vocab_size=V, order=order, buckets=BUCKETS)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_padding_and_zero_weights_change_nothing():
    ids, mask = _padded(n=4, length=8)
    table, idf, bias = _random_weights(3)
    layer = layers.NgramLogits(V, C, 3, BUCKETS)
    x = [tf.constant(ids), tf.constant(mask)]
    np.testing.assert_array_equal(layer(x).numpy(), 0.0)  # initial weights: a no-op term
    layer.set_weights([table, idf, bias])
    longer = [tf.constant(np.pad(ids, [(0, 0), (0, 5)])), tf.constant(np.pad(mask, [(0, 0), (0, 5)]))]
    np.testing.assert_allclose(layer(longer).numpy(), layer(x).numpy(), atol=1e-6)


def test_unigram_features_equal_scikit_learn_tfidf():
    from sklearn.feature_extraction.text import TfidfVectorizer

    ids, mask = _padded(seed=3, n=30)
    docs = [[str(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask)]
    vec = TfidfVectorizer(analyzer=lambda d: d, sublinear_tf=True)
    want = vec.fit_transform(docs).toarray()
    counts = ngram.tf_counts(ids, mask, V, 1, BUCKETS)
    got = ngram.tfidf(counts, ngram.fit_idf(counts), V, 1, BUCKETS).toarray()
    columns = [int(t) for t in vec.get_feature_names_out()]
    np.testing.assert_allclose(got[:, columns], want, atol=1e-9)
    assert np.all(np.delete(got, columns, axis=1) == 0)


def test_each_order_is_normalised_on_its_own():
    ids, mask = _padded(seed=4, n=10, length=10)
    counts = ngram.tf_counts(ids, mask, V, 3, BUCKETS)
    x = ngram.tfidf(counts, ngram.fit_idf(counts), V, 3, BUCKETS).toarray()
    for start, end in ngram.blocks(V, 3, BUCKETS):
        norms = np.linalg.norm(x[:, start:end], axis=1)
        np.testing.assert_allclose(norms[norms > 0], 1.0, atol=1e-9)


def _keyword_task(n=200, length=10, seed=0):
    """Class = which of three keywords (ids 5, 6, 7) a random text holds; other ids are noise."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, V, (n, length))
    y = rng.integers(0, C, n)
    ids[np.arange(n), rng.integers(1, length - 1, n)] = 5 + y
    ids[:, 0] = 2
    return ids.astype(np.int32), np.ones_like(ids, np.int32), y


def test_fitted_weights_classify_held_out_texts():
    ids, mask, y = _keyword_task()
    table, idf, bias = ngram.fit_ngram_logits(ids, mask, y, C, vocab_size=V, order=2, buckets=BUCKETS, c=4.0)
    test_ids, test_mask, test_y = _keyword_task(seed=1)
    logits = ngram.ngram_logits(test_ids, test_mask, table, idf, bias, vocab_size=V, order=2, buckets=BUCKETS)
    assert (logits.argmax(1) == test_y).mean() > 0.95


def test_binary_fit_gives_one_logit_per_class():
    ids, mask, y = _keyword_task()
    keep = y < 2
    table, _, bias = ngram.fit_ngram_logits(ids[keep], mask[keep], y[keep], 2, vocab_size=V, order=1,
                                            buckets=BUCKETS, c=4.0)
    assert table.shape == (V, 2) and bias.shape == (2,)
    np.testing.assert_allclose(table[:, 0], -table[:, 1])


def test_fit_mix_drops_an_uninformative_term():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    good = np.stack([-(2 * y - 1), 2 * y - 1], 1) * 2.0 + rng.normal(size=(500, 2))
    noise = rng.normal(size=(500, 2)) * 3.0
    beta, alpha = ngram.fit_mix(good, noise, y)
    assert beta > 0.5 and alpha < 0.1 * beta
    beta, alpha = ngram.fit_mix(noise, good, y)
    assert alpha > 0.5 and beta < 0.1 * alpha


def test_hash_that_could_overflow_int32_is_refused():
    with pytest.raises(ValueError, match="int32"):
        ngram.check_sizes(8000, 3, 2**20)
    with pytest.raises(ValueError, match="order"):
        ngram.check_sizes(100, 4, 64)


def test_model_with_fitted_ngrams_saves_reloads_and_converts(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    seq = 12
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3,
                      ngram_buckets=BUCKETS)
    model = build.build_model(cfg, V, C, seq)
    model.get_layer("ngrams").set_weights(list(_random_weights(3)))
    ids, mask = _padded(n=6, length=seq)
    x = {"input_word_ids": ids, "input_mask": mask, "input_type_ids": np.zeros_like(ids)}
    ref = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(build.load_model(tmp_path / "model.keras").predict(x, verbose=0), ref, atol=1e-6)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([build.serving_function(model, seq)], model)
    runner = Interpreter(model_content=converter.convert()).get_signature_runner()
    got = np.concatenate([next(iter(runner(**{k: v[i:i + 1] for k, v in x.items()}).values()))
                          for i in range(len(ids))])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_encoder_reads_the_first_wordpieces_and_the_ngram_term_all(tmp_path):
    """model.max_encoder_len < seq_len: a change past the encoder's reach moves only the n-gram term's logits,
    in Keras, after reloading, and in the .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    seq, reach = 24, 8
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=2,
                      ngram_buckets=BUCKETS, max_encoder_len=reach)
    model = build.build_model(cfg, V, C, seq)
    assert spec.encoder_length(cfg, seq) == reach and model.get_layer("embedding").max_len == reach
    ids = np.repeat(np.random.default_rng(3).integers(3, V, (1, seq)).astype(np.int32), 2, axis=0)
    ids[1, reach:] = (ids[0, reach:] + 1) % (V - 3) + 3  # the two texts differ only past the reach
    x = {"input_word_ids": ids, "input_mask": np.ones_like(ids), "input_type_ids": np.zeros_like(ids)}
    logits = build.logits_model(model)
    without = logits(x).numpy()
    np.testing.assert_allclose(without[0], without[1], atol=1e-6)  # the n-gram term is still all zero
    model.get_layer("ngrams").set_weights(list(_random_weights(2)))
    ref = model.predict(x, verbose=0)
    assert np.abs(logits(x).numpy()[0] - logits(x).numpy()[1]).max() > 1e-3
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(build.load_model(tmp_path / "model.keras").predict(x, verbose=0), ref, atol=1e-6)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([build.serving_function(model, seq)], model)
    runner = Interpreter(model_content=converter.convert()).get_signature_runner()
    got = np.concatenate([next(iter(runner(**{k: v[i:i + 1] for k, v in x.items()}).values())) for i in range(2)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_int8_export_runs_on_texts_too_short_for_bigrams_and_trigrams():
    """A text of [CLS] [SEP] alone has no seen bigram or trigram: their norm is zero, which full-int8
    division refused ('data[i] != zero_point') before the term multiplied by RSQRT instead."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.export.convert import export_tflite

    seq = 12
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3, ngram_buckets=BUCKETS)
    model = build.build_model(cfg, V, C, seq)
    # large idf and full-length calibration texts: norm2 spans hundreds, so in int8 a norm of 1 rounds to 0
    model.get_layer("ngrams").set_weights(list(_random_weights(3, idf_range=(6.0, 8.0))))
    ids = np.random.default_rng(5).integers(3, V, (40, seq)).astype(np.int32)
    mask = np.ones_like(ids)

    def representative():
        for i in range(len(ids)):
            yield {"input_word_ids": ids[i:i + 1], "input_mask": mask[i:i + 1],
                   "input_type_ids": np.zeros_like(ids[i:i + 1])}

    runner = Interpreter(model_content=export_tflite(model, seq, "int8", representative)).get_signature_runner()
    short = np.zeros((1, seq), np.int32)
    short[0, :2] = [2, 3]
    out = next(iter(runner(input_word_ids=short, input_mask=(short > 0).astype(np.int32),
                           input_type_ids=np.zeros_like(short)).values()))
    assert out.shape == (1, C) and np.all(np.isfinite(out)) and abs(float(out.sum()) - 1.0) < 0.05


def test_ngram_counts_in_the_tflite_file_grow_linearly_with_the_text(tmp_path):
    """Long texts (data.max_seq_len 1024) must not cost seq^2 memory on a phone: no tensor of the converted
    term holds a value per pair of positions; and the counts do not split XNNPACK's graph in two."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.measure.tflite_file import op_placement

    seq = 256
    ids_in, mask_in = tf.keras.Input((seq,), dtype=tf.int32), tf.keras.Input((seq,), dtype=tf.int32)
    layer = layers.NgramLogits(V, C, 3, BUCKETS)
    model = tf.keras.Model([ids_in, mask_in], layer([ids_in, mask_in]))
    layer.set_weights(list(_random_weights(3)))
    fn = tf.function(lambda i, m: model([i, m]), input_signature=[tf.TensorSpec([1, seq], tf.int32)] * 2)
    path = tmp_path / "ngrams.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model).convert())
    assert op_placement(path)["xnnpack_partitions"] == 1
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    rows = ngram.num_rows(V, 3, BUCKETS)  # the fitted table and idf: one entry per n-gram row, not per position
    largest = max(int(np.prod(d["shape"])) for d in interpreter.get_tensor_details()
                  if not (len(d["shape"]) and d["shape"][0] == rows))
    assert largest <= 3 * seq * C, largest  # the gathered weights of every position's n-grams
    ids, mask = _padded(n=1, length=seq)
    inputs = interpreter.get_input_details()
    for d, v in zip(sorted(inputs, key=lambda d: d["index"]), (ids, mask)):
        interpreter.set_tensor(d["index"], v)
    interpreter.invoke()
    want = ngram.ngram_logits(ids, mask, *_random_weights(3), vocab_size=V, order=3, buckets=BUCKETS)
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), want, atol=1e-5)
