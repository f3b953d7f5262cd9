"""Classification metrics, the same code for every model and the baseline: accuracy, macro F1, per-class
precision/recall/F1, confusion matrix, ROC-AUC, log loss and calibration error (ECE)."""
import numpy as np

from pipeline.core.errors import PipelineError

ECE_BINS = 15


def rank_auc(y, scores):
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


def roc_points(y, scores):
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
        return rank_auc(y_true == 1, probs[:, 1])
    aucs = [rank_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
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
