"""Evaluate a model directory or .tflite file on labelled data, and classify texts with it."""
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from pipeline import INPUT_NAMES  # the package root also sets TF_USE_LEGACY_KERAS before TensorFlow
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, write_json
from pipeline.text.tokenizer import encode, load_vocabulary, make_tokenizer

BATCH_ELEMENTS = 1 << 23  # rows x width^2 of a predict batch: 32 texts of 512 wordpieces, 8 of 1024
BATCH_SIZE = 256
ECE_BINS = 15
EXPECTED = "expected a trained model directory (with model.keras) or a .tflite file"


# ---------------------------------------------------------------- predictors


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
        # changes no prediction (pipeline/model.py, "Masking"), and most texts are far shorter than seq_len.
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
    from pipeline.model.layers import load_model  # knows the custom layers and TFMOT wrappers

    try:
        return load_model(model_dir / "model.keras")
    except PipelineError:
        raise
    except Exception as e:  # a corrupt or incompatible model.keras: report it, don't crash
        raise PipelineError(f"{model_dir / 'model.keras'}: cannot load the model ({type(e).__name__}: {e})") from None


class TFLitePredictor:
    """A .tflite file; vocab.txt and labels.txt come from its metadata, its directory or the one above."""

    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter

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


def load_predictor(path):
    """A predictor for a model directory, a baseline directory (model.joblib) or a .tflite file:
    .labels, .seq_len, .predict_proba(texts)."""
    from pipeline.core import manifest

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found; {EXPECTED}")
    manifest.verify_if_listed(path)  # refuse a truncated or altered artifact of a run
    if path.is_dir() and (path / "model.joblib").is_file():  # saved_models/<run>/baseline
        from pipeline.measure.baseline import BaselinePredictor

        run_dir = path.resolve().parent  # saved_models/<run>: verify the directory when its manifest lists it
        if (run_dir / manifest.NAME).is_file() and path.name in manifest.load(run_dir)["artifacts"]:
            manifest.verify(run_dir, path.name)
        return BaselinePredictor(path)
    if path.is_dir():
        return KerasPredictor(path)
    if path.suffix == ".keras":  # model.keras given directly: its directory holds the rest
        return KerasPredictor(path.parent)
    return TFLitePredictor(path)


# ---------------------------------------------------------------- metrics


def _rank_auc(y, scores):
    """ROC-AUC as the Mann-Whitney U statistic, ties given their average rank; None without both classes."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    # runs of equal scores share the mean of the 1-based ranks they span
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _roc_points(y, scores):
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    y, s = np.asarray(y, bool)[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def roc_auc(y_true, probs):
    """Binary: AUC of the class-1 score; more classes: macro one-vs-rest over classes with both outcomes."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    if probs.shape[1] == 2:
        return _rank_auc(y_true == 1, probs[:, 1])
    aucs = [_rank_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def classification_metrics(y_true, probs, labels):
    """Accuracy, macro F1, per-class P/R/F1, confusion matrix, ROC-AUC, log loss and ECE, JSON-ready."""
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    n, num_classes = len(y_true), len(labels)
    if n == 0:
        raise PipelineError("no examples to evaluate")
    if probs.shape != (n, num_classes):
        raise ValueError(f"probs has shape {probs.shape}, expected ({n}, {num_classes})")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"y_true must be class ids in [0, {num_classes})")

    pred = probs.argmax(axis=1)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    # 0 where the denominator is 0: no predictions of a class means precision 0
    precision = np.divide(tp, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(num_classes), where=support > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros(num_classes), where=pr > 0)

    # clipped: a true-class probability of 0 (common after int8 output quantization) would give inf
    log_loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y_true], 1e-15, 1.0))))

    confidence = probs.max(axis=1)
    correct = pred == y_true
    # bin b holds confidences in (edge b, edge b+1]; comparing against the edges themselves (not
    # ceil(conf * 15)) keeps a confidence of exactly 0.6 in the bin that ends at 0.6
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())

    return {
        "n": int(n),
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "roc_auc": roc_auc(y_true, probs),
        "log_loss": log_loss,
        "ece": float(ece),
    }


# ---------------------------------------------------------------- plots


def _save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def plot_confusion_matrix(cm, labels, path):
    """Write the confusion matrix (rows true, columns predicted) as a PNG."""
    from matplotlib.figure import Figure  # Figure without pyplot: Agg canvas, no GUI backend

    cm = np.asarray(cm)
    size = 2.5 + 0.5 * len(labels)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    return _save_figure(fig, path)


def plot_roc_curves(y_true, probs, labels, path):
    """Write ROC curves as a PNG: the class-1 curve for two classes, one-vs-rest curves otherwise."""
    from matplotlib.figure import Figure

    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    classes = [1] if len(labels) == 2 else range(len(labels))
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for c in classes:
        auc = _rank_auc(y_true == c, probs[:, c])
        if auc is None:  # no positives or no negatives: the curve is undefined
            continue
        fpr, tpr = _roc_points(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    return _save_figure(fig, path)


def _log_tensorboard(log_dir, result, image_paths):
    import tensorflow as tf

    # this directory holds one evaluation, as metrics.json does: earlier event files would show as
    # duplicate points at step 0
    for old in Path(log_dir).glob("events.out.tfevents.*"):
        old.unlink()
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for key in ("accuracy", "macro_f1", "roc_auc", "log_loss", "ece"):
            if result[key] is not None:
                tf.summary.scalar(f"eval/{key}", result[key], step=0)
        for label, m in result["per_class"].items():
            tf.summary.scalar(f"eval_f1/{label}", m["f1"], step=0)
        for name, p in image_paths.items():
            image = tf.image.decode_png(Path(p).read_bytes(), channels=4)
            tf.summary.image(f"eval/{name}", image[None], step=0)
        # indented four spaces: the text plugin renders Markdown, and this keeps the JSON as code
        text = "\n".join("    " + line for line in json.dumps(result, indent=2).splitlines())
        tf.summary.text("eval/metrics", text, step=0)
    writer.flush()
    writer.close()


# ---------------------------------------------------------------- stages


def run_evaluate(cfg, model_path, data_path, out_dir=None):
    """Evaluate a model on a labelled data file; print one JSON object and, with out_dir, save it with plots."""
    from pipeline.stages import data

    predictor = load_predictor(model_path)
    examples = data.read_table(data_path, cfg.data)  # with line numbers, for the unknown-label error
    texts, labels, lines = examples["texts"], examples["labels"], examples["lines"]
    label_ids = {label: i for i, label in enumerate(predictor.labels)}
    unknown = [i for i, label in enumerate(labels) if label not in label_ids]
    if unknown:
        i = unknown[0]
        raise PipelineError(f"{data_path}:{lines[i]}: label '{labels[i]}' is not one the model knows "
                            f"({', '.join(predictor.labels)}); {len(unknown)} example(s) have unknown labels")
    y_true = np.array([label_ids[label] for label in labels], np.int64)
    probs = predictor.predict_proba(list(texts))
    result = {"model": str(model_path), "data": str(data_path),
              **classification_metrics(y_true, probs, predictor.labels)}
    print(json.dumps(result), flush=True)

    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "metrics.json", result)
        images = {
            "confusion_matrix": plot_confusion_matrix(result["confusion_matrix"], predictor.labels,
                                                      out_dir / "confusion_matrix.png"),
            "roc_curve": plot_roc_curves(y_true, probs, predictor.labels, out_dir / "roc_curve.png"),
        }
        _log_tensorboard(out_dir / "tensorboard", result, images)
    return result


TABLE_TEXT_WIDTH = 60  # characters of each text that `predict --table` shows


def prediction_table(results):
    """Aligned lines: each text (one line, cut to TABLE_TEXT_WIDTH), its label and that label's probability."""
    texts = [" ".join(r["text"].split()) for r in results]
    texts = [t if len(t) <= TABLE_TEXT_WIDTH else t[:TABLE_TEXT_WIDTH - 1] + "…" for t in texts]
    text_w = max([4, *map(len, texts)])
    label_w = max([5, *(len(r["label"]) for r in results)])
    lines = [f"{'text':<{text_w}}  {'label':<{label_w}}  probability"]
    lines += [f"{t:<{text_w}}  {r['label']:<{label_w}}  {r['scores'][r['label']]:11.3f}" for t, r in zip(texts, results)]
    return lines


def run_predict(cfg, model_path, texts, runtime="litert", table=False):
    """Classify texts; print one JSON line per text with its label and every label's probability, or with
    `table` an aligned table. runtime "mediapipe" runs a .tflite through MediaPipe Tasks' TextClassifier."""
    if runtime == "mediapipe":
        from pipeline.export.metadata import MediaPipeClassifier

        if Path(model_path).suffix != ".tflite":
            raise PipelineError(f"{model_path}: --runtime mediapipe needs a .tflite file")
        with MediaPipeClassifier(model_path) as predictor:
            probs = predictor.predict_proba(list(texts))
    else:
        predictor = load_predictor(model_path)
        probs = predictor.predict_proba(list(texts))
    results = []
    for text, p in zip(texts, probs):
        result = {"text": text, "label": predictor.labels[int(p.argmax())],
                  "scores": {label: float(s) for label, s in zip(predictor.labels, p)}}
        if not table:
            print(json.dumps(result), flush=True)
        results.append(result)
    if table:
        print("\n".join(prediction_table(results)), flush=True)
    return results
