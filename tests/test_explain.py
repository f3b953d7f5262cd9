"""Tests of explain (pipeline/stages/explain.py, pipeline/measure/attribution.py) on a tiny two-block model with a non-zero n-gram term (vocab 16, seq_len 12)."""
import json
import re
import shutil

import numpy as np
import pytest

import pipeline  # noqa: F401  (before TensorFlow: tf.keras must be tf-keras)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "great", "awful", "plot", "the",
         "a", "was", "##s", "fun"]
LABELS = ["negative", "neutral", "positive"]
SEQ_LEN = 12
TEXTS = ["good movie", "the plot was awful", "a great great fun movies", "bad"]
# Integrated gradients with 50 trapezoidal steps: |sum of attributions - logit change| must stay below
# 1% of the change plus 1e-4 (measured on this model: well under 0.1%).
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 0.01, 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as training writes it (random weights, n-gram term set)."""
    import tensorflow as tf

    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model

    tf.keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(d_model=16, num_layers=2, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3,
                                    ngram_buckets=64), len(VOCAB), len(LABELS), SEQ_LEN)
    rng = np.random.default_rng(0)
    table, idf, bias = model.get_layer("ngrams").get_weights()
    model.get_layer("ngrams").set_weights([rng.normal(size=table.shape).astype(np.float32),
                                           rng.uniform(1.0, 3.0, idf.shape).astype(np.float32),
                                           rng.normal(size=bias.shape).astype(np.float32)])
    root = tmp_path_factory.mktemp("explain") / "toy"
    root.mkdir()
    model.save(root / "model.keras")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (root / "preprocess.json").write_text(json.dumps({"seq_len": SEQ_LEN}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """A copy of model_dir with tflite/float32.tflite exported as compress does (a converter run: slow)."""
    import tensorflow as tf

    from pipeline.model.build import load_model, serving_function

    root = tmp_path_factory.mktemp("exported") / "toy"
    shutil.copytree(model_dir, root)
    model = load_model(root / "model.keras")
    (root / "tflite").mkdir()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(model, SEQ_LEN)], model)
    (root / "tflite" / "float32.tflite").write_bytes(converter.convert())
    return root


@pytest.fixture(scope="module")
def explainer(model_dir):
    from pipeline.measure.attribution import Explainer

    return Explainer(model_dir)


@pytest.fixture(scope="module")
def results(explainer):
    """explain() of every text of TEXTS for its predicted class and for class 0."""
    inputs = explainer.encode(TEXTS)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(len(TEXTS))]
    return [explainer.explain(r) for r in rows] + [explainer.explain(r, target=0) for r in rows]


def test_integrated_gradients_are_complete_and_padding_gets_nothing(results, explainer):
    for r in results:
        change = r["transformer_logit"] - r["transformer_baseline_logit"]
        assert abs(change) > 1e-2  # a real change to account for
        assert abs(r["ig"].sum() - change) <= RELATIVE_TOLERANCE * abs(change) + ABSOLUTE_TOLERANCE
        padding = np.asarray(r["mask"]) == 0
        assert padding.any() and np.all(r["ig"][padding] == 0) and np.all(r["ngram"][padding] == 0)
        # the n-gram shares are exact: they sum to the layer's logit minus its bias
        bias = explainer.ngrams.bias.numpy()[r["target"]]
        assert r["ngram"].sum() == pytest.approx(r["ngram_logit"] - bias, abs=1e-5)
        assert np.abs(r["ngram"]).sum() > 1e-3
    assert {r["target"] for r in results[len(TEXTS):]} == {0}


def test_more_steps_close_the_completeness_gap(explainer):
    inputs = {k: v[0] for k, v in explainer.encode(["the plot was awful"]).items()}

    def gap(steps):
        r = explainer.explain(inputs, steps=steps)
        return abs(r["ig"].sum() - (r["transformer_logit"] - r["transformer_baseline_logit"]))

    assert gap(50) < gap(1)


def test_attention_rows_sum_to_one_and_padded_keys_get_no_weight(results, explainer):
    import tensorflow as tf

    for r in results:
        assert len(r["attention"]) == 2  # every block
        real = np.asarray(r["mask"]) != 0
        for w in r["attention"]:
            assert w.shape == (2, SEQ_LEN, SEQ_LEN)
            np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)
            assert w[:, :, ~real].max() < 1e-6
            assert w[:, real][:, :, real].max() > 0.1

    # the flag only adds an output: the block's result is the same with and without it
    x = tf.random.normal([1, SEQ_LEN, 16])
    mask = tf.constant(np.asarray(results[0]["mask"], np.float32)[None])
    block = explainer.blocks[0]
    out, _ = block([x, mask], return_attention=True)
    np.testing.assert_allclose(out.numpy(), block([x, mask]).numpy(), atol=1e-6)


def test_cli_writes_json_and_a_self_contained_page_for_text_outside_the_vocabulary(model_dir, tmp_path, capsys):
    from pipeline.__main__ import main

    out = tmp_path / "out"
    texts = ["good ☃ plot ü 😀 <b>", "great"]
    assert main(["explain", "--model", str(model_dir), *texts, "--out", str(out), "--steps", "20"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in records] == texts
    first = records[0]
    assert first["tokens"][0] == "[CLS]" and first["tokens"][-1] == "[SEP]" and "[UNK]" in first["tokens"]
    assert first["label"] in LABELS and first["class"] == first["label"] and 0 < first["probability"] <= 1
    assert len(first["attributions"]) == len(first["tokens"]) == len(first["integrated_gradients"]["attributions"])
    assert first["integrated_gradients"]["steps"] == 20
    assert sum(first["attributions"]) == pytest.approx(first["logit"] - first["baseline_logit"], abs=1e-2)
    assert all(np.asarray(block).shape == (2, len(first["tokens"]), len(first["tokens"]))
               for block in first["attention"])

    page = (out / "explain.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "[UNK]" in page and "☃" in page and "&lt;b&gt;" in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page) and "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 4  # a heatmap per text and block
    for i in range(2):
        for b in range(2):
            assert (out / "attention" / f"text{i}_block{b}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(line)["text"] for line in (out / "explanations.jsonl").read_text().splitlines()] == texts


def test_class_option_explains_another_class(model_dir, capsys):
    from pipeline.__main__ import main

    assert main(["explain", "--model", str(model_dir), "good movie", "--class", "neutral"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["class"] == "neutral" and record["class_probability"] < 1


FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + b"\x00" * 24  # the FlatBuffer identifier is all the lookup reads


def test_a_tflite_file_maps_to_the_keras_model_it_was_exported_from(tmp_path):
    from pipeline.measure.attribution import keras_source

    run = tmp_path / "run"
    for name, data in (("tflite/int8.tflite", FAKE_TFLITE + b"int8"), ("tflite/distilled_int8.tflite",
                       FAKE_TFLITE + b"student"), ("model.keras", b""), ("distilled/model.keras", b""),
                       ("mobile/model.tflite", FAKE_TFLITE + b"student"), ("elsewhere/x.tflite", FAKE_TFLITE)):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    assert keras_source(run / "tflite" / "int8.tflite")[0] == run
    assert keras_source(run / "tflite" / "distilled_int8.tflite")[0] == run / "distilled"
    folder, why = keras_source(run / "mobile" / "model.tflite")  # the shipped copy of distilled_int8
    assert folder == run / "distilled" and str(run / "distilled" / "model.keras") in why
    assert keras_source(run / "elsewhere" / "x.tflite")[0] == run  # the directory above
    (run / "mobile" / "model.tflite").write_bytes(FAKE_TFLITE + b"int8")
    assert keras_source(run / "mobile" / "model.tflite")[0] == run


@pytest.mark.e2e
def test_tflite_is_explained_through_the_keras_model_it_came_from(exported, capsys):
    from pipeline.__main__ import main

    assert main(["explain", "--model", str(exported / "tflite" / "float32.tflite"), "good movie"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert str(exported / "model.keras") in record["note"] and str(exported / "model.keras") in captured.err
    assert record["tflite"]["label"] == record["label"]
    assert record["tflite"]["probability"] == pytest.approx(record["probability"], abs=1e-4)


def test_bad_input_stops_with_one_error_line(model_dir, tmp_path, capsys):
    from pipeline.__main__ import main

    lone = tmp_path / "lone" / "model.tflite"
    lone.parent.mkdir()
    lone.write_bytes(FAKE_TFLITE)
    (tmp_path / "notes.tflite").write_text("not a model")
    for argv, problem in (([str(model_dir), "--class", "nope"], "--class 'nope' is not one of the model's labels"),
                          ([str(lone)], "no Keras model it came from"),
                          ([str(tmp_path / "notes.tflite")], "not a TFLite model"),
                          ([str(tmp_path / "missing")], "missing: not found")):
        assert main(["explain", "--model", *argv, "good"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and err.count("\n") == 1, err


def dev_split(n=40):
    rng = np.random.default_rng(1)
    words = [w for w in VOCAB[5:] if not w.startswith("##")]
    texts = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(n)]
    return texts, [LABELS[i % 3] for i in range(n)]


def test_error_analysis_lists_the_most_confident_errors_with_their_words(model_dir, explainer, tmp_path):
    from pipeline.measure.predictors import KerasPredictor
    from pipeline.measure.error_analysis import error_analysis, log_examples, render_section, WRONG_EXAMPLES

    texts, labels = dev_split()
    predictor = KerasPredictor(model_dir)
    analysis = error_analysis(predictor, explainer, texts, labels, steps=10)
    probs = predictor.predict_proba(texts)
    pred = probs.argmax(axis=1)
    wrong = [i for i in range(len(texts)) if LABELS[pred[i]] != labels[i]]
    errors = analysis["most_confident_errors"]
    assert len(errors) == min(len(wrong), WRONG_EXAMPLES) > 0
    expected = sorted(probs[wrong, pred[wrong]], reverse=True)[:len(errors)]
    assert [e["probability"] for e in errors] == pytest.approx(expected)
    assert all(e["label"] != e["predicted"] and e["top_words"] for e in errors)
    assert all(w in texts[e["line"] - 1].split() for e in errors for w, _ in e["top_words"])
    assert sum(b["n"] for b in analysis["accuracy_by_length"]) == len(texts)
    for c, label in enumerate(LABELS):
        hits = np.sum((pred == c) & (np.array(labels) == label))
        assert analysis["per_class"][label]["recall"] == pytest.approx(hits / labels.count(label))
        assert analysis["per_class"][label]["precision"] == pytest.approx(hits / max(1, np.sum(pred == c)))

    md, page = render_section(analysis, "int8")
    text = "\n".join(md)
    assert "## Error analysis (dev set)" in text and "**int8**" in text and errors[0]["text"] in text
    assert "<h2>Error analysis (dev set)</h2>" in page and "Per class" in page

    records = log_examples(tmp_path / "tb", explainer, texts, labels, steps=5)
    assert [r["text"] for r in records] == texts[:3]  # the first text of each class
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.e2e
def test_report_section_analyses_the_shipped_tflite(exported, tmp_path):
    from pipeline.core.config import load_config
    from pipeline.measure.error_analysis import report_section

    run_dir = tmp_path / "saved_models" / "toy"
    shutil.copytree(exported, run_dir)
    texts, labels = dev_split()
    dev = tmp_path / "data" / "processed" / "toy" / "dev.jsonl"
    dev.parent.mkdir(parents=True)
    dev.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    cfg = load_config(None, [f"paths.data={tmp_path / 'data'}", f"paths.models={tmp_path / 'saved_models'}",
                             f"paths.runs={tmp_path / 'runs'}"])
    md, page = report_section(cfg, "toy", run_dir, "float32")
    analysis = json.loads((run_dir / "report" / "error_analysis.json").read_text())
    assert analysis["variant"] == "float32" and str(run_dir / "model.keras") in analysis["explained_with"]
    assert "**float32**" in "\n".join(md) and list((tmp_path / "runs" / "toy" / "explain").glob("events.out.*"))


def test_length_buckets_and_words():
    from pipeline.measure.error_analysis import length_buckets, words

    buckets = length_buckets([0, 8, 9, 16, 40, 600], [True, False, True, True, False, True])
    assert buckets == [{"bucket": "0-8", "n": 2, "accuracy": 0.5}, {"bucket": "9-16", "n": 2, "accuracy": 1.0},
                       {"bucket": "33-64", "n": 1, "accuracy": 0.0}, {"bucket": "513+", "n": 1, "accuracy": 1.0}]
    assert words(["[CLS]", "movie", "##s", "are", "fun", "[SEP]"], [9, 1.0, 0.5, 0.25, -1.0, 9]) == [
        ("movies", 1.5), ("are", 0.25), ("fun", -1.0)]
