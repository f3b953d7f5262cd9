"""Evaluation stage: metrics on hand-built arrays, plots, TensorBoard, Keras/TFLite predictors, errors."""
import json
import math

import numpy as np
import pytest

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.plots import plot_confusion_matrix, plot_roc_curves
from pipeline.measure.predictors import load_predictor
from pipeline.stages.evaluate import run_evaluate, run_predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def probs_for(pred, num_classes, top=0.8):
    """Rows with `top` on the predicted class and the rest spread evenly."""
    probs = np.full((len(pred), num_classes), (1 - top) / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = top
    return probs


def binary(scores):
    scores = np.asarray(scores, float)
    return np.stack([1 - scores, scores], axis=1)


# ---------------------------------------------------------------- metrics


def test_known_confusion_three_classes():
    # confusion (rows true a/b/c, columns predicted): [[3,1,0],[0,2,1],[2,0,1]]
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0, 0, 2])
    m = classification_metrics(y_true, probs_for(pred, 3), ["a", "b", "c"])

    assert set(m) == {"n", "accuracy", "macro_f1", "per_class", "confusion_matrix", "roc_auc", "log_loss", "ece"}
    assert m["n"] == 10
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [2, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.6)
    pc = m["per_class"]
    assert pc["a"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["c"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert m["macro_f1"] == pytest.approx(26 / 45)
    # the true class gets 0.8 when right and 0.1 when wrong
    assert m["log_loss"] == pytest.approx(-(6 * math.log(0.8) + 4 * math.log(0.1)) / 10)
    # one confidence bin (0.8) holding accuracy 0.6
    assert m["ece"] == pytest.approx(0.2)
    json.dumps(m)  # plain Python types only


def test_class_never_predicted_nor_present_scores_zero():
    y_true = np.array([0, 1, 1, 0])
    m = classification_metrics(y_true, probs_for(np.array([0, 1, 0, 0]), 3), ["x", "y", "z"])
    assert m["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["y"]["precision"] == 1.0 and m["per_class"]["y"]["recall"] == 0.5
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)


@pytest.mark.parametrize("y, scores, expected", [
    ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfectly ranked
    ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # perfectly reversed
    ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # constant: every pair tied
    # positives 0.4, 0.8, 0.9 against negatives 0.1, 0.4, 0.8: (1 + .5 + 0) + (1 + 1 + .5) + 3 = 7 of 9 pairs
    ([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.4, 0.8, 0.8, 0.9], 7 / 9),
])
def test_binary_roc_auc(y, scores, expected):
    m = classification_metrics(np.array(y), binary(scores), ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(expected)


def test_rank_auc_matches_pairs_and_curve_area_with_ties():
    from pipeline.measure.metrics import roc_points as _roc_points

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    scores = rng.integers(0, 10, 200) / 10  # many ties
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    auc = classification_metrics(y, binary(scores), ["0", "1"])["roc_auc"]
    assert auc == pytest.approx(pairs)
    fpr, tpr = _roc_points(y == 1, scores)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(pairs)  # the plotted curve's area


def test_roc_auc_three_classes_macro_one_vs_rest_skips_a_class_without_positives():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[.7, .2, .1], [.5, .3, .2], [.4, .5, .1], [.2, .2, .6]])
    # class 0: positives .7 .5 vs negatives .4 .2 -> 1; class 1: .5 .2 vs .2 .3 -> (2 + .5) / 4;
    # class 2 has no positives, so it is left out of the mean
    assert classification_metrics(y_true, probs, ["a", "b", "c"])["roc_auc"] == pytest.approx((1 + 0.625) / 2)


def test_roc_auc_is_none_with_one_class_only():
    m = classification_metrics(np.array([1, 1, 1]), binary([0.2, 0.6, 0.9]), ["neg", "pos"])
    assert m["roc_auc"] is None
    json.dumps(m)


def test_ece_zero_when_calibrated_and_known_otherwise():
    correct_first = lambda k, n: np.array([1] * k + [0] * (n - k))  # noqa: E731  (1 = predicted class right)
    # confidence 0.8 with 4 of 5 right, 0.6 with 3 of 5 right: calibrated
    conf = np.array([0.8] * 5 + [0.6] * 5)
    y = np.r_[correct_first(4, 5), correct_first(3, 5)]
    assert classification_metrics(y, binary(conf), ["0", "1"])["ece"] == pytest.approx(0.0, abs=1e-12)
    # 0.9 with 4 of 5 right (gap .1), 0.6 with 2 of 5 right (gap .2): (.1 + .2) / 2
    conf = np.array([0.9] * 5 + [0.6] * 5)
    y = np.r_[correct_first(4, 5), correct_first(2, 5)]
    assert classification_metrics(y, binary(conf), ["0", "1"])["ece"] == pytest.approx(0.15)
    # a confidence on a bin edge (0.6 = 9/15) belongs to the bin that ends there: with 0.55 in (8/15, 9/15],
    # accuracy .5 against mean confidence .575
    assert classification_metrics(np.array([1, 0]), binary([0.55, 0.6]), ["0", "1"])["ece"] == pytest.approx(0.075)
    # 0.90 and 0.92 share the bin (13/15, 14/15]: accuracy .5 against mean confidence .91
    assert classification_metrics(np.array([1, 0]), binary([0.9, 0.92]), ["0", "1"])["ece"] == pytest.approx(0.41)


def test_log_loss_clips_zero_probabilities():
    m = classification_metrics(np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]]), ["a", "b"])
    assert math.isfinite(m["log_loss"]) and m["log_loss"] == pytest.approx(-math.log(1e-15) / 2)


# ---------------------------------------------------------------- plots and TensorBoard


def test_plots_are_png(tmp_path):
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = probs_for(np.array([0, 1, 1, 1, 2, 0]), 3)
    cm = classification_metrics(y_true, probs, ["a", "b", "c"])["confusion_matrix"]
    plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    plot_roc_curves(y_true, probs, ["a", "b", "c"], tmp_path / "roc.png")
    plot_roc_curves(np.array([0, 1, 1]), binary([0.3, 0.6, 0.2]), ["n", "p"], tmp_path / "roc2.png")
    for name in ("cm.png", "roc.png", "roc2.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "roc.png", "roc2.png"]  # no temp files left


# ---------------------------------------------------------------- predictors on a tiny model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "great", "awful", "plot", "the", "a"]
LABELS = ["negative", "positive"]
SEQ_LEN = 8
TEXTS = ["good movie", "bad plot", "the great movie", "awful", "a the good bad movie plot great awful extra words", ""]


def tiny_model(vocab_size, seq_len, num_classes):
    """Three int32 inputs -> token + type embeddings -> masked mean -> dense softmax."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    ids = tf.keras.Input((seq_len,), dtype=tf.int32, name="input_word_ids")
    mask = tf.keras.Input((seq_len,), dtype=tf.int32, name="input_mask")
    types = tf.keras.Input((seq_len,), dtype=tf.int32, name="input_type_ids")
    init = tf.keras.initializers.RandomNormal
    tokens = tf.keras.layers.Embedding(vocab_size, 8, embeddings_initializer=init(stddev=1.0, seed=1))(ids)
    segments = tf.keras.layers.Embedding(2, 8, embeddings_initializer=init(stddev=1.0, seed=2))(types)
    x = tf.keras.layers.Add()([tokens, segments])
    m = tf.expand_dims(tf.cast(mask, tf.float32), -1)
    pooled = tf.reduce_sum(x * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)
    out = tf.keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init(stddev=1.0, seed=3))(pooled)
    return tf.keras.Model({"input_word_ids": ids, "input_mask": mask, "input_type_ids": types}, out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as training writes it, plus tflite/float.tflite and tflite/int8.tflite inside."""
    import tensorflow as tf

    from pipeline.text.tokenizer import encode

    root = tmp_path_factory.mktemp("run")
    model = tiny_model(len(VOCAB), SEQ_LEN, len(LABELS))
    model.save(root / "model.keras")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (root / "preprocess.json").write_text(json.dumps({"seq_len": SEQ_LEN}), encoding="utf-8")

    (root / "tflite").mkdir()
    (root / "tflite" / "float.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())

    sample = encode(VOCAB, TEXTS * 4, SEQ_LEN)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    n = len(sample["input_word_ids"])
    converter.representative_dataset = lambda: ({k: v[i:i + 1] for k, v in sample.items()} for i in range(n))
    converter.inference_output_type = tf.int8  # so the predictor has to dequantize the output
    (root / "tflite" / "int8.tflite").write_bytes(converter.convert())
    return root


@pytest.fixture(scope="module")
def keras_probs(model_dir):
    """The Keras predictor's probabilities for TEXTS, the reference the TFLite predictors must match."""
    return load_predictor(model_dir).predict_proba(TEXTS)


def test_keras_and_tflite_predictors_agree(model_dir, keras_probs):
    keras = load_predictor(model_dir)
    lite = load_predictor(model_dir / "tflite" / "float.tflite")
    assert keras.labels == lite.labels == LABELS
    assert keras.seq_len == lite.seq_len == SEQ_LEN
    p_keras, p_lite = keras_probs, lite.predict_proba(TEXTS)
    assert p_keras.shape == p_lite.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(p_keras.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-4)
    assert np.ptp(p_keras[:, 1]) > 0.01  # the texts do get different scores
    assert keras.predict_proba([]).shape == (0, 2)
    assert load_predictor(model_dir / "model.keras").labels == LABELS  # the file stands for its directory


def test_predictors_on_the_pipeline_transformer(tmp_path):
    """The real model class (custom layers, loaded through pipeline.model.build.load_model) and its TFLite export."""
    import tensorflow as tf

    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model, serving_function

    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3),
                        len(VOCAB), 3, SEQ_LEN)
    model.save(tmp_path / "model.keras")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "preprocess.json").write_text(json.dumps({"seq_len": SEQ_LEN}), encoding="utf-8")
    (tmp_path / "tflite").mkdir()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(model, SEQ_LEN)], model)
    (tmp_path / "tflite" / "float.tflite").write_bytes(converter.convert())

    p_keras = load_predictor(tmp_path).predict_proba(TEXTS)
    assert p_keras.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(load_predictor(tmp_path / "tflite" / "float.tflite").predict_proba(TEXTS), p_keras,
                               atol=1e-4)


@pytest.mark.parametrize("elements", [1 << 23, 40 * 40 * 2])
def test_keras_predictor_cuts_padding_without_changing_predictions(tmp_path, monkeypatch, elements):
    """Batches of short texts are cut to their longest text, and long texts go in fewer rows (BATCH_ELEMENTS);
    the probabilities stay those of full-length inputs."""
    import tensorflow as tf

    from pipeline.measure import predictors as evaluate

    monkeypatch.setattr(evaluate, "BATCH_ELEMENTS", elements)  # the second: 2 rows of the longest texts a batch

    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model
    from pipeline.text.tokenizer import encode

    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0), len(VOCAB), 2, 40)
    model.save(tmp_path / "model.keras")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "preprocess.json").write_text(json.dumps({"seq_len": 40}), encoding="utf-8")
    texts = TEXTS + ["good " * 30, "bad plot " * 9]
    expected = model.predict(encode(VOCAB, texts, 40), verbose=0)
    np.testing.assert_allclose(load_predictor(tmp_path).predict_proba(texts), expected, atol=1e-5)


def test_tflite_reads_vocab_and_labels_from_embedded_metadata(model_dir, keras_probs, tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # TFLite metadata packs associated files as a zip after the model
        z.writestr("vocab.txt", "\n".join(VOCAB) + "\n")
        z.writestr("labels.txt", "neg\npos\n")
    path = tmp_path / "alone.tflite"  # no vocab.txt / labels.txt beside it
    path.write_bytes((model_dir / "tflite" / "float.tflite").read_bytes() + buf.getvalue())
    lite = load_predictor(path)
    assert lite.labels == ["neg", "pos"]
    np.testing.assert_allclose(lite.predict_proba(TEXTS), keras_probs, atol=1e-4)


def test_tflite_without_vocab_or_labels(model_dir, tmp_path):
    path = tmp_path / "a" / "alone.tflite"
    path.parent.mkdir()
    path.write_bytes((model_dir / "tflite" / "float.tflite").read_bytes())
    with pytest.raises(PipelineError, match="no vocab.txt in its metadata, beside it"):
        load_predictor(path)


def test_int8_output_is_dequantized(model_dir, keras_probs):
    lite = load_predictor(model_dir / "tflite" / "int8.tflite")
    out = lite.interpreter.get_output_details()[0]
    assert out["dtype"] == np.int8
    p_int8 = lite.predict_proba(TEXTS)
    np.testing.assert_allclose(p_int8, keras_probs, atol=0.05)


def test_keras_batches_match_whole(model_dir, keras_probs, monkeypatch):
    import pipeline.measure.predictors as ev

    monkeypatch.setattr(ev, "BATCH_SIZE", 4)  # 6 texts -> batches of 4 and 2
    np.testing.assert_allclose(load_predictor(model_dir).predict_proba(TEXTS), keras_probs, atol=1e-6)


def write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path


def test_run_evaluate_prints_json_and_writes_artifacts(model_dir, tmp_path, capsys):
    data = write_tsv(tmp_path / "dev.tsv", [("good movie", "positive"), ("bad plot", "negative"),
                                            ("great movie", "positive"), ("awful plot", "negative")])
    out = tmp_path / "eval"
    result = run_evaluate(Config(), str(model_dir), str(data), str(out))
    printed = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert printed == result
    assert printed["model"] == str(model_dir) and printed["data"] == str(data) and printed["n"] == 4
    assert sum(map(sum, printed["confusion_matrix"])) == 4
    assert json.loads((out / "metrics.json").read_text()) == result
    for name in ("confusion_matrix.png", "roc_curve.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    run_evaluate(Config(), str(model_dir), str(data), str(out))  # again: replaces, does not add
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_run_evaluate_on_tflite_matches_keras(model_dir, tmp_path, capsys):
    data = write_tsv(tmp_path / "dev.tsv", [("good movie", "positive"), ("bad plot", "negative"),
                                            ("the awful movie", "negative")])
    keras = run_evaluate(Config(), str(model_dir), str(data))
    lite = run_evaluate(Config(), str(model_dir / "tflite" / "float.tflite"), str(data))
    assert keras["confusion_matrix"] == lite["confusion_matrix"]
    assert lite["log_loss"] == pytest.approx(keras["log_loss"], abs=1e-4)


def test_run_predict_prints_one_json_line_per_text(model_dir, capsys):
    run_predict(Config(), str(model_dir), ["good movie", "bad plot"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["text"] == "good movie" and set(first["scores"]) == set(LABELS)
    assert first["label"] == max(first["scores"], key=first["scores"].get)
    assert sum(first["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_run_evaluate_on_a_csv_with_other_column_names(model_dir, tmp_path, capsys):
    rows = [("positive", "good movie"), ("negative", "bad plot"), ("positive", "great movie"),
            ("negative", "awful plot")]
    data = tmp_path / "dev.csv"
    data.write_text("sentiment,review\n" + "".join(f"{l},{t}\n" for l, t in rows), encoding="utf-8")
    result = run_evaluate(Config(), str(model_dir), str(data))
    out, err = capsys.readouterr()
    assert json.loads(out) == result and result["n"] == 4  # the header is no example
    assert sum(result["confusion_matrix"][0]) == 2 and sum(result["confusion_matrix"][1]) == 2
    assert "text column 'review', label column 'sentiment'" in err


def predict_cli(capsys, *argv):
    """The texts `python -m pipeline predict` printed, in order."""
    from pipeline.__main__ import main

    assert main(["predict", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = [json.loads(line) for line in lines]
    assert all(r["label"] in LABELS and set(r["scores"]) == set(LABELS) for r in results)
    return [r["text"] for r in results]


def test_predict_file_txt_one_text_per_line(model_dir, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_text("good movie\n\n  bad plot  \r\nthe great movie\n\n", encoding="utf-8")
    assert predict_cli(capsys, "--model", str(model_dir), "--file", str(path)) == ["good movie", "bad plot",
                                                                                   "the great movie"]
    # positional texts still work, and come first
    assert predict_cli(capsys, "--model", str(model_dir), "awful", "--file", str(path))[:2] == ["awful", "good movie"]


def test_predict_file_from_stdin(model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("good movie\n\nbad plot é\n".encode("utf-8"))))
    assert predict_cli(capsys, "--model", str(model_dir), "--file", "-") == ["good movie", "bad plot é"]


def test_predict_table_aligns_text_label_and_probability(model_dir, capsys):
    from pipeline.__main__ import main
    from pipeline.stages.evaluate import TABLE_TEXT_WIDTH

    long = "the great movie " * 10
    assert main(["predict", "--model", str(model_dir), "good movie", "bad\tplot", long]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--model", str(model_dir), "--table", "good movie", "bad\tplot", long]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["text", "label", "probability"] and len(rows) == 3
    label_at = header.index("label")
    assert label_at == TABLE_TEXT_WIDTH + 2  # the long text sets the width, cut to it
    assert rows[0].startswith("good movie ") and rows[1].startswith("bad plot ")  # one line per text
    assert rows[2][:label_at].rstrip() == long[:TABLE_TEXT_WIDTH - 1] + "…"
    for row, result in zip(rows, results):
        label, probability = row[label_at:].split()
        assert label == result["label"] and float(probability) == pytest.approx(max(result["scores"].values()), abs=5e-4)
        assert len(row) == len(header)  # probabilities end under the header's last letter


def test_predict_table_from_stdin_in_a_fresh_process(model_dir):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(model_dir), "--file", "-",
                           "--table"], input="good movie\n\nbad plot é\n", capture_output=True, text=True,
                          encoding="utf-8", cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # TensorFlow's start-up lines are not shown
    header, *rows = done.stdout.splitlines()
    assert header.startswith("text") and [r.split()[:2] for r in rows] == [["good", "movie"], ["bad", "plot"]]
    assert all(r.split()[-2] in LABELS and 0.5 <= float(r.split()[-1]) <= 1 for r in rows)


def test_predict_file_table_reads_its_text_column(model_dir, tmp_path, capsys):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment\ngood movie,positive\nbad plot,negative\nawful,negative\ngreat,positive\n")
    assert predict_cli(capsys, "--model", str(model_dir), "--file", str(path)) == ["good movie", "bad plot",
                                                                                   "awful", "great"]


def test_predict_without_texts_or_file_is_a_usage_error(model_dir, capsys):
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", str(model_dir)])
    assert e.value.code == 2 and "give texts to classify, or --file F" in capsys.readouterr().err


def test_predict_file_errors_in_one_line(model_dir, tmp_path, capsys):
    from pipeline.__main__ import main

    (tmp_path / "bad.txt").write_bytes(b"good\nbad \xff\n")
    for path, problem in ((tmp_path / "bad.txt", "bad.txt:2: invalid UTF-8"),
                          (tmp_path / "nope.txt", "file not found")):
        assert main(["predict", "--model", str(model_dir), "--file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and err.count("\n") == 1


# ---------------------------------------------------------------- errors


def test_cli_reports_a_bad_model_path_in_one_line(tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["predict", "--model", str(tmp_path / "nope"), "some text"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not found" in err and "\n" not in err


def test_missing_model_path(tmp_path):
    with pytest.raises(PipelineError, match="not found.*model directory.*tflite"):
        load_predictor(tmp_path / "nope")


@pytest.mark.parametrize("content", [b"", b"just some text, not a model\n", b"\x00" * 64])
def test_file_that_is_not_a_model(tmp_path, content):
    path = tmp_path / "model.tflite"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="not a TFLite model"):
        load_predictor(path)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(PipelineError, match="no model.keras"):
        load_predictor(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_tflite(model_dir, tmp_path, keep):
    data = (model_dir / "tflite" / "float.tflite").read_bytes()
    path = tmp_path / "tflite" / "cut.tflite"
    path.parent.mkdir()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(PipelineError, match="cut.tflite: cannot load the TFLite model"):
        load_predictor(path)


def test_unknown_label_names_file_and_line(model_dir, tmp_path):
    data = write_tsv(tmp_path / "dev.tsv", [("good movie", "positive"), ("bad plot", "negative"),
                                            ("what", "neutral"), ("odd", "meh")])
    with pytest.raises(PipelineError, match=r"dev.tsv:4: label 'neutral'"):
        run_evaluate(Config(), str(model_dir), str(data))


def test_corrupt_model_keras(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("tflite"))
    (broken / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="model.keras: cannot load"):
        load_predictor(broken)
