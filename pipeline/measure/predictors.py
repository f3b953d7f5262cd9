"""Predictors behind one interface, for a trained model directory (Keras), a .tflite file (LiteRT), the
bag-of-words baseline and a .tflite run by MediaPipe Tasks as apps run it: each has .labels, .path and
.predict_proba(texts) -> float32 [len(texts), len(labels)]; load_predictor picks one for a path."""
import io
import json
import math
import zipfile
from pathlib import Path

import joblib
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from pipeline import INPUT_NAMES
from pipeline.core import manifest
from pipeline.core.errors import PipelineError
from pipeline.text.tokenizer import encode, load_vocabulary, make_tokenizer

BATCH_ELEMENTS = 1 << 23  # rows x width^2 of a predict batch: 32 texts of 512 wordpieces, 8 of 1024
BATCH_SIZE = 256
EXPECTED = "expected a trained model directory (with model.keras) or a .tflite file"
BASELINE_FILE = "model.joblib"  # the baseline's scikit-learn pipeline in its directory, beside labels.txt
LABELS_FILE = "labels.txt"  # one label per line, in the model's output order


def load_predictor(path):
    """A predictor for a model directory, a baseline directory (model.joblib) or a .tflite file:
    .labels, .seq_len, .predict_proba(texts)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found; {EXPECTED}")
    manifest.verify_if_listed(path)  # refuse a truncated or altered artifact of a run
    if path.is_dir() and (path / BASELINE_FILE).is_file():  # saved_models/<run>/baseline
        run_dir = path.resolve().parent  # saved_models/<run>: verify the directory when its manifest lists it
        if (run_dir / manifest.NAME).is_file() and path.name in manifest.load(run_dir)["artifacts"]:
            manifest.verify(run_dir, path.name)
        return BaselinePredictor(path)
    if path.is_dir():
        return KerasPredictor(path)
    if path.suffix == ".keras":  # model.keras given directly: its directory holds the rest
        return KerasPredictor(path.parent)
    return TFLitePredictor(path)


def read_labels(path):
    labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise PipelineError(f"{path}: no labels (expected one label per line)")
    return labels


class KerasPredictor:
    """A trained model directory: model.keras, vocab.txt, labels.txt, preprocess.json."""

    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        for name in ("model.keras", "vocab.txt", "labels.txt", "preprocess.json"):
            if not (model_dir / name).is_file():
                raise PipelineError(f"{model_dir}: no {name}; {EXPECTED}")
        self.path = model_dir
        self.labels = read_labels(model_dir / "labels.txt")
        self.tokenizer = make_tokenizer(model_dir / "vocab.txt")  # built once, not per encode() call
        try:
            self.seq_len = int(json.loads((model_dir / "preprocess.json").read_text(encoding="utf-8"))["seq_len"])
        except (ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{model_dir / 'preprocess.json'}: expected {{\"seq_len\": int}} ({e})") from None
        self.model = _load_keras_model(model_dir)
        self._any_length = all(t.shape[1] is None for t in self.model.inputs)  # pipeline models: [B, None] inputs

    def predict_proba(self, texts):
        if not texts:
            return np.zeros((0, len(self.labels)), np.float32)
        inputs = encode(self.tokenizer, list(texts), self.seq_len)
        # Texts in order of length, each batch cut to its longest (rounded up to 8: few traced shapes): padding
        # changes no prediction (pipeline/model/layers.py, "Masking"), and most texts are far shorter than seq_len.
        # Attention and the n-gram counts hold [rows, width, width] tensors: long texts go in fewer rows.
        lengths = inputs["input_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), len(self.labels)), np.float32)

        def width_of(rows):
            return (min(self.seq_len, 8 * math.ceil(max(int(lengths[rows].max()), 1) / 8)) if self._any_length
                    else self.seq_len)

        start = 0
        while start < len(texts):
            width = width_of(order[start:start + BATCH_SIZE])
            size = max(1, min(BATCH_SIZE, len(texts), BATCH_ELEMENTS // (width * width)))
            rows = order[start:start + size]
            start += size
            width = width_of(rows)
            batch = {k: v[rows, :width] for k, v in inputs.items()}
            m = len(rows)
            # the last batch is padded (repeating its last row) to the batch size: fewer traced shapes
            batch = {k: np.pad(v, [(0, size - m), (0, 0)], mode="edge") for k, v in batch.items()}
            # predict_on_batch: no progress bar on stdout, which carries the JSON output
            probs = np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)[:m]
            out[rows] = _check_width(probs, self.labels, self.path)
        return out


def _load_keras_model(model_dir):
    # imported here, not above: the model code loads TFMOT (~1 s), which .tflite and baseline predictors do without
    from pipeline.model.build import load_model  # knows the custom layers and TFMOT wrappers

    try:
        return load_model(model_dir / "model.keras")
    except PipelineError:
        raise
    except Exception as e:  # a corrupt or incompatible model.keras: report it, don't crash
        raise PipelineError(f"{model_dir / 'model.keras'}: cannot load the model ({type(e).__name__}: {e})") from None


class TFLitePredictor:
    """A .tflite file; vocab.txt and labels.txt come from its metadata, its directory or the one above."""

    def __init__(self, path):
        path = Path(path)
        data = path.read_bytes()
        # A FlatBuffer's file identifier sits at bytes 4..8; checking it first rejects a wrong file
        # with a clear message before the interpreter sees it.
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise PipelineError(f"{path}: not a TFLite model; {EXPECTED}")
        try:
            self.interpreter = Interpreter(model_content=data)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise PipelineError(f"{path}: cannot load the TFLite model, truncated or corrupt? ({e})") from None
        self.path = path
        vocab, self.labels = _tflite_assets(path, data)
        self.tokenizer = make_tokenizer(vocab)

        details = self.interpreter.get_input_details()
        self.inputs = {}
        for key in INPUT_NAMES:  # match by name: converters do not keep the input order
            found = [d for d in details if key in d["name"]]
            if len(found) != 1:
                names = ", ".join(d["name"] for d in details)
                raise PipelineError(f"{path}: expected one input named like '{key}', found inputs: {names}")
            self.inputs[key] = found[0]
        self.seq_len = int(self.inputs["input_word_ids"]["shape"][-1])
        self.output = self.interpreter.get_output_details()[0]
        for d in list(self.inputs.values()):  # the model's batch dimension may be dynamic; use 1
            if d["shape"][0] != 1:
                self.interpreter.resize_tensor_input(d["index"], [1, self.seq_len])
        self.interpreter.allocate_tensors()

    def predict_proba(self, texts):
        n = len(texts)
        probs = np.zeros((n, len(self.labels)), np.float32)
        if n == 0:
            return probs
        encoded = encode(self.tokenizer, list(texts), self.seq_len)
        for i in range(n):
            for key, d in self.inputs.items():
                self.interpreter.set_tensor(d["index"], _quantize(encoded[key][i:i + 1], d))
            self.interpreter.invoke()
            out = _dequantize(self.interpreter.get_tensor(self.output["index"]), self.output)
            probs[i] = _check_width(out.reshape(1, -1), self.labels, self.path)[0]
        return probs


def _tflite_assets(path, data):
    """(vocab, labels): embedded metadata files first (a zip appended to the model), then beside the file."""
    embedded = {}
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            embedded = {n: z.read(n).decode("utf-8") for n in ("vocab.txt", "labels.txt") if n in z.namelist()}

    def beside(name):
        for folder in (path.parent, path.parent.parent):
            if (folder / name).is_file():
                return folder / name
        raise PipelineError(f"{path}: no {name} in its metadata, beside it or in {path.parent.parent}")

    if "vocab.txt" in embedded:  # split("\n") as load_vocabulary does: splitlines() also breaks on some tokens
        vocab = embedded["vocab.txt"].rstrip("\n").split("\n")
    else:
        vocab = load_vocabulary(beside("vocab.txt"))
    labels_text = embedded.get("labels.txt")
    if labels_text is None:
        labels_text = beside("labels.txt").read_text(encoding="utf-8")
    labels = [line.strip() for line in labels_text.splitlines() if line.strip()]
    if not labels:
        raise PipelineError(f"{path}: labels.txt has no labels")
    return vocab, labels


def _quantize(x, detail):
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    # only narrow quantized inputs are scaled; int32 token ids stay as they are
    if dtype in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
    return x.astype(dtype)


def _dequantize(x, detail):
    scale, zero_point = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (x.astype(np.float32) - zero_point) * scale
    return x.astype(np.float32)


def _check_width(probs, labels, path):
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise PipelineError(f"{path}: the model outputs {probs.shape[1:]} scores per text, "
                            f"but labels.txt has {len(labels)} labels")
    return probs


class BaselinePredictor:
    """A baseline directory (model.joblib, labels.txt): .labels, .path, .predict_proba(texts)."""

    seq_len = None  # the vectorizers read whole texts; there is no token limit

    def __init__(self, path):
        path = Path(path)
        for name in (BASELINE_FILE, "labels.txt"):
            if not (path / name).is_file():
                raise PipelineError(f"{path}: no {name}; expected a baseline directory (model.joblib, labels.txt)")
        self.path = path
        self.labels = read_labels(path / "labels.txt")
        try:
            self.model = joblib.load(path / BASELINE_FILE)
            classes = [str(c) for c in self.model.classes_]
        except Exception as e:  # truncated, or pickled by an incompatible scikit-learn
            raise PipelineError(f"{path / BASELINE_FILE}: cannot load the baseline ({type(e).__name__}: {e})") from None
        # sklearn orders classes_ by sorting; labels.txt is the model's order, so map each label to its column
        if sorted(classes) != sorted(self.labels) or len(classes) != len(self.labels):
            raise PipelineError(f"{path}: model.joblib knows classes {classes}, labels.txt has {self.labels}")
        self.columns = np.array([classes.index(label) for label in self.labels])

    def predict_proba(self, texts):
        if not len(texts):
            return np.zeros((0, len(self.labels)), np.float32)
        return np.asarray(self.model.predict_proba(list(texts)), np.float32)[:, self.columns]


class MediaPipeClassifier:
    """A .tflite with our metadata run by MediaPipe Tasks' TextClassifier, as an app would."""

    def __init__(self, path):
        # imported here, not above: MediaPipe takes ~1 s to load, and only compress and --runtime mediapipe use it
        from mediapipe.tasks.python.core.base_options import BaseOptions
        from mediapipe.tasks.python.text import TextClassifier, TextClassifierOptions

        self.path = Path(path)
        options = TextClassifierOptions(base_options=BaseOptions(model_asset_path=str(self.path)), max_results=-1)
        try:
            self._classifier = TextClassifier.create_from_options(options)
        except (OSError, ValueError, RuntimeError) as e:
            # MediaPipe's messages span lines and name graph nodes; the cause follows the last "failed: ".
            cause = " ".join(str(e).split()).rsplit("failed: ", 1)[-1]
            raise PipelineError(f"{self.path}: MediaPipe cannot load it as a text classifier: {cause}") from None
        try:
            with zipfile.ZipFile(self.path) as z:
                text = z.read(LABELS_FILE).decode("utf-8")
        except (KeyError, zipfile.BadZipFile):
            self.close()
            raise PipelineError(f"{self.path}: no {LABELS_FILE} in its metadata") from None
        self.labels = [line.strip() for line in text.splitlines() if line.strip()]

    def predict_proba(self, texts) -> np.ndarray:
        """Scores [len(texts), len(labels)] float32, columns in label (model output) order."""
        probs = np.zeros((len(texts), len(self.labels)), np.float32)
        for i, text in enumerate(texts):
            categories = self._classifier.classify(text).classifications[0].categories
            if len(categories) != len(self.labels):
                raise PipelineError(f"{self.path}: the model outputs {len(categories)} scores per text, "
                                    f"but its {LABELS_FILE} has {len(self.labels)} labels")
            for c in categories:
                probs[i, c.index] = c.score  # MediaPipe sorts categories by score
        return probs

    def close(self):
        """Release MediaPipe's graph. Close (or use `with`) before exit: MediaPipe's own __del__ fails
        with a TypeError once interpreter shutdown has begun."""
        self._classifier.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
