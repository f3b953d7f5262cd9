"""The bag-of-words baseline every run is compared with: TF-IDF word and character n-grams and a
logistic regression (scikit-learn), fitted on the same processed train split as the Transformer."""
import time
from pathlib import Path

import joblib
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from pipeline.core import files
from pipeline.measure.metrics import classification_metrics  # the model's metrics code, so the numbers compare
from pipeline.measure.predictors import BASELINE_FILE, BaselinePredictor

NAME = "bag-of-words baseline"


def make_baseline():
    """The published comparison recipe: word 1-2-grams and char_wb 2-5-grams, TF-IDF, logistic regression."""
    features = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
    ])
    return Pipeline([("tfidf", features), ("logreg", LogisticRegression(C=4, max_iter=2000))])


def run_baseline(splits, out_dir, labels) -> dict:
    """Fit the baseline on splits["train"], save it to out_dir, score dev (and test when present).
    splits: {split: (texts, label strings)}, as the train stage read them.
    Returns {"dev", "test"?, "bytes", "gzip_bytes", "fit_seconds", "path"}."""
    out_dir, labels = Path(out_dir), list(labels)
    model = make_baseline()
    t0 = time.perf_counter()
    model.fit(*splits["train"])
    fit_seconds = time.perf_counter() - t0

    # the directory appears whole or not at all: a predictor never sees a model without its labels
    with files.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        joblib.dump(model, tmp / BASELINE_FILE)
        (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")

    predictor = BaselinePredictor(out_dir)  # score the saved model, as `pipeline evaluate` would load it
    result = {split: classification_metrics([labels.index(g) for g in gold], predictor.predict_proba(texts), labels)
              for split, (texts, gold) in splits.items() if split in ("dev", "test")}
    content = (out_dir / BASELINE_FILE).read_bytes()
    return {**result, "bytes": len(content),
            "gzip_bytes": files.gzip_size(content),  # as compress.py measures the .tflite variants
            "fit_seconds": fit_seconds, "path": str(out_dir)}


def verdict(model_scores, baseline_scores, split="dev"):
    """One sentence (lower-case start) comparing the Transformer and the baseline on one split's accuracy and
    macro F1."""
    ma, ba = model_scores["accuracy"], baseline_scores["accuracy"]
    mf, bf = model_scores["macro_f1"], baseline_scores["macro_f1"]
    numbers = (f"accuracy: Transformer {100 * ma:.2f}%, baseline {100 * ba:.2f}%; "
               f"macro F1: Transformer {mf:.4f}, baseline {bf:.4f}")
    if ma < ba or mf < bf:
        return f"the {NAME} is better on {split} ({numbers})"
    verb = "beats" if ma > ba and mf > bf else "matches or beats"
    return f"the Transformer {verb} the {NAME} on {split} ({numbers})"


def comparison_table(model: dict, baseline: dict) -> str:
    """Aligned plain-text table of accuracy and macro F1, Transformer vs baseline, per split; then a verdict per
    split (dev picks the best epoch and can flatter either side: on SST-2 it shares phrases with train)."""
    header = ["split", "model acc %", "baseline acc %", "Δ acc (pt)", "model macro-F1", "baseline macro-F1",
              "Δ macro-F1"]
    rows = [header]
    for split in ("dev", "test"):
        if split in model and split in baseline:
            m, b = model[split], baseline[split]
            rows.append([split, f"{100 * m['accuracy']:.2f}", f"{100 * b['accuracy']:.2f}",
                         f"{100 * (m['accuracy'] - b['accuracy']):+.2f}", f"{m['macro_f1']:.4f}",
                         f"{b['macro_f1']:.4f}", f"{m['macro_f1'] - b['macro_f1']:+.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines += [verdict(model[split], baseline[split], split) for split in ("dev", "test")
              if split in model and split in baseline]
    return "\n".join(lines)
