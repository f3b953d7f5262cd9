"""Evaluate and predict (`make evaluate`, `python -m pipeline evaluate` and `predict`): score a model directory or
.tflite file on a labelled data file, and classify texts with it. The predictors are in
pipeline/measure/predictors.py, the metrics in pipeline/measure/metrics.py."""
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json
from pipeline.lm.runs import is_lm, score_file
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.predictors import MediaPipeClassifier, load_predictor
from pipeline.text.read import read_table


def run_evaluate(cfg, model_path, data_path, out_dir=None):
    """Evaluate a model on a labelled data file (a language model: on a text file); print one JSON object and,
    with out_dir, save it (a classifier's with plots)."""
    if is_lm(model_path):
        return run_lm_evaluate(model_path, data_path, out_dir)
    predictor = load_predictor(model_path)
    examples = read_table(data_path, cfg.data)  # with line numbers, for the unknown-label error
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
        # imported only with --out: matplotlib takes ~0.5 s to import, which `predict` and `evaluate` without --out skip
        from pipeline.measure.plots import plot_confusion_matrix, plot_roc_curves

        out_dir = Path(out_dir)
        write_json(out_dir / "metrics.json", result)
        images = {
            "confusion_matrix": plot_confusion_matrix(result["confusion_matrix"], predictor.labels,
                                                      out_dir / "confusion_matrix.png"),
            "roc_curve": plot_roc_curves(y_true, probs, predictor.labels, out_dir / "roc_curve.png"),
        }
        _log_tensorboard(out_dir / "tensorboard", result, images)
    return result


def run_lm_evaluate(model_path, data_path, out_dir=None):
    """A language model's cross-entropy per token, perplexity, bits per character and next-token accuracy on a
    text file, as one JSON object (and out_dir/metrics.json)."""
    result = {"model": str(model_path), "data": str(data_path), "task": "lm", **score_file(model_path, data_path)}
    print(json.dumps(result), flush=True)
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    return result


def _log_tensorboard(log_dir, result, image_paths):
    """The evaluation's metrics, per-class F1, plots and JSON in TensorBoard at log_dir (replacing earlier ones)."""

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
