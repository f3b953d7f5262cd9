"""MediaPipe metadata: exported classifiers run in MediaPipe Tasks' TextClassifier as in the pipeline."""
import io
import zipfile

import numpy as np
import pytest

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from pipeline.core.errors import PipelineError
from pipeline.export.metadata import add_metadata, MEDIAPIPE_INPUT_NAMES, read_metadata
from pipeline.measure.predictors import MediaPipeClassifier

LABELS = ["negative", "positive", "neutral"]
SEQ_LEN = 16
# Each sentence is repeated well over 10 times so the WordPiece learner keeps its words, accented
# and CJK ones included.
SENTENCES = ["the café crème was good", "a great movie !", "awful plot, don't watch", "bad (boring) film",
             "the cafe was fine", "Hello World", "你好 world", "brûlée is lovely", "very good and great"]
CORPUS = SENTENCES * 15
# Text where a tokenizer can go wrong: accents (MediaPipe keeps them), non-ASCII capitals (MediaPipe
# lowercases A-Z only), punctuation, unknown words, CJK, emoji, control and format characters,
# a word over 100 bytes, a text longer than SEQ_LEN tokens, blank text.
TRICKY = [
    "café crème brûlée", "cafe creme brulee", "CAFÉ Crème", "GREAT movie", "great!!!", "don't", "(awful)",
    "zyzzyva qwxj", "你好", "好world", "😀 good", "❤️ great", "ﬁne ÀB Σ", "x\u200by good", "good\u00a0movie",
    "tab\tand\nnew\x0bline", "w" * 120 + " good", "good " * 40 + "awful", " ", "",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"dir", "vocab", "float32": (bytes, path), "int8": (bytes, path)}: a tiny Transformer exported
    without metadata (bytes) and with it (path)."""
    import tensorflow as tf

    from pipeline.export.convert import export_tflite
    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model
    from pipeline.text.tokenizer import encode, learn_vocabulary, save_vocabulary

    root = tmp_path_factory.mktemp("mediapipe")
    vocab = learn_vocabulary(CORPUS, 150)
    save_vocabulary(vocab, root / "vocab.txt")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3),
                        len(vocab), len(LABELS), SEQ_LEN)
    sample = encode(vocab, SENTENCES + TRICKY, SEQ_LEN)

    def representative():
        return ({k: v[i:i + 1] for k, v in sample.items()} for i in range(len(sample["input_word_ids"])))

    out = {"dir": root, "vocab": vocab}
    for mode in ("float32", "int8"):
        raw = export_tflite(model, SEQ_LEN, mode, representative if mode == "int8" else None)
        path = root / f"{mode}.tflite"
        path.write_bytes(add_metadata(raw, root / "vocab.txt", root / "labels.txt", f"liteformer-{mode}",
                                      "Tiny test classifier."))
        out[mode] = (raw, path)
    return out


@pytest.mark.parametrize("mode, atol", [("float32", 1e-5), ("int8", 1e-3)])
def test_mediapipe_text_classifier_matches_the_pipeline(exported, mode, atol):
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.text import TextClassifier, TextClassifierOptions

    from pipeline.measure.predictors import TFLitePredictor

    path = exported[mode][1]
    texts = SENTENCES + ["a good film", "awful, boring movie"]
    expected = TFLitePredictor(path).predict_proba(texts)  # vocab.txt and labels.txt from the metadata too
    assert np.ptp(expected, axis=0).max() > 0.05  # the sentences get different scores

    options = TextClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    with TextClassifier.create_from_options(options) as classifier:
        for text, row in zip(texts, expected):
            categories = classifier.classify(text).classifications[0].categories
            assert sorted(c.index for c in categories) == list(range(len(LABELS)))
            assert all(c.category_name == LABELS[c.index] for c in categories)  # labels.txt names the output
            assert categories[0].category_name == LABELS[int(row.argmax())]  # the top category
            np.testing.assert_allclose([c.score for c in categories], [row[c.index] for c in categories], atol=atol)

    with MediaPipeClassifier(path) as mp:
        assert mp.labels == LABELS and mp.path == path
        got = mp.predict_proba(texts)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=atol)


def run_interpreter(content, inputs):
    """(names of the inputs in model order, outputs [n, num_labels]) of LiteRT on encoded inputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    keys = [next(k for k in inputs if k in d["name"]) for d in details]
    rows = []
    for i in range(len(inputs["input_word_ids"])):
        for key, d in zip(keys, details):
            interpreter.set_tensor(d["index"], inputs[key][i:i + 1])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
    return keys, np.array(rows)


def test_metadata_and_files_survive_and_the_model_is_unchanged(exported):
    from pipeline.text.tokenizer import encode

    raw, path = exported["float32"]
    content = path.read_bytes()
    meta = read_metadata(content)
    assert meta["name"] == "liteformer-float32" and meta["description"] == "Tiny test classifier."
    assert meta["output"] == "probability"
    assert meta["associated_files"] == meta["files"] == ["vocab.txt", "labels.txt"]
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        for name in ("vocab.txt", "labels.txt"):
            assert z.read(name) == (exported["dir"] / name).read_bytes()

    inputs = encode(exported["vocab"], TRICKY, SEQ_LEN)
    keys, with_metadata = run_interpreter(content, inputs)
    _, without = run_interpreter(raw, inputs)
    np.testing.assert_array_equal(with_metadata, without)
    # The metadata lists the inputs in the model's own order, whatever order the converter chose.
    assert meta["inputs"] == [MEDIAPIPE_INPUT_NAMES[k] for k in keys]

    # Adding metadata again replaces it: one entry, one zip, the new name.
    again = add_metadata(content, exported["dir"] / "vocab.txt", exported["dir"] / "labels.txt", "renamed", "")
    assert read_metadata(again)["name"] == "renamed" and read_metadata(again)["files"] == ["vocab.txt", "labels.txt"]
    assert again.count(b"TFLITE_METADATA") == 1 and again.count(b"PK\x05\x06") == 1  # one zip directory end


def test_tokenizer_matches_mediapipe_on_tricky_text(exported):
    """Same scores means same token ids: the random model gives different ids different scores."""
    from pipeline.measure.predictors import TFLitePredictor

    path = exported["float32"][1]
    ours = TFLitePredictor(path).predict_proba(TRICKY)
    with MediaPipeClassifier(path) as mp:
        theirs = mp.predict_proba(TRICKY)
    for text, a, b in zip(TRICKY, ours, theirs):
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=repr(text))
    # The texts are told apart, so the comparison is not vacuous; accents change the tokens, in both.
    assert len({tuple(np.round(row, 5)) for row in ours}) >= len(TRICKY) - 4
    assert not np.allclose(ours[TRICKY.index("café crème brûlée")], ours[TRICKY.index("cafe creme brulee")])


def test_errors_name_the_file(exported, tmp_path):
    import tensorflow as tf

    bare = tmp_path / "bare.tflite"
    bare.write_bytes(exported["float32"][0])  # no metadata: MediaPipe finds no tokenizer
    with pytest.raises(PipelineError, match=r"bare.tflite: MediaPipe cannot load it.*metadata") as err:
        MediaPipeClassifier(bare)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="missing.tflite: MediaPipe cannot load it"):
        MediaPipeClassifier(tmp_path / "missing.tflite")

    x = tf.keras.Input((SEQ_LEN,), dtype=tf.int32, name="tokens")
    odd = tf.keras.Model(x, tf.keras.layers.Dense(2)(tf.cast(x, tf.float32)))
    with pytest.raises(PipelineError, match="odd: model input '.*tokens.*' is none of input_word_ids"):
        add_metadata(tf.lite.TFLiteConverter.from_keras_model(odd).convert(), exported["dir"] / "vocab.txt",
                     exported["dir"] / "labels.txt", "odd", "")
