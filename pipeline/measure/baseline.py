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
