"""The project's PNG plots (matplotlib, no GUI backend): confusion matrix, ROC curves, accuracy against a cost
with its Pareto front, training curves and attention heatmaps."""
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # Figure without pyplot: Agg canvas, no GUI backend
from matplotlib.ticker import FuncFormatter

from pipeline.core.files import atomic_path
from pipeline.measure.compare import pareto_front
from pipeline.measure.metrics import rank_auc, roc_points


def save_figure(fig, path):
    """Write `fig` as a PNG at `path` (atomically); return the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def plot_confusion_matrix(cm, labels, path):
    """Write the confusion matrix (rows true, columns predicted) as a PNG."""
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
    return save_figure(fig, path)


def plot_roc_curves(y_true, probs, labels, path):
    """Write ROC curves as a PNG: the class-1 curve for two classes, one-vs-rest curves otherwise."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    classes = [1] if len(labels) == 2 else range(len(labels))
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for c in classes:
        auc = rank_auc(y_true == c, probs[:, c])
        if auc is None:  # no positives or no negatives: the curve is undefined
            continue
        fpr, tpr = roc_points(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    return save_figure(fig, path)


def _plain(value, _position=None):
    """A log-axis tick as a plain number (0.3, 1, 20), not a power of ten."""
    return f"{value:g}"


def tradeoff_figure(rows, key, xlabel, scale=1.0):
    """Accuracy against a cost (`rows[key] * scale`, log axis), the Pareto front joined and marked; points
    at one place share a label, and a label that would cover another moves down."""
    rows = [r for r in rows if r.get(key) is not None]
    points = [(r[key] * scale, 100 * r["accuracy"]) for r in rows]
    front = sorted(pareto_front(points), key=lambda i: points[i][0])
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (x, y) in enumerate(points):
        ax.scatter([x], [y], color="tab:red" if i in front else "tab:blue", zorder=3)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", linestyle="--",
            label="Pareto front")
    ax.set_xscale("log")
    decades = np.log10(max(x for x, _ in points) / min(x for x, _ in points))
    ax.xaxis.set_major_formatter(FuncFormatter(_plain))
    ax.xaxis.set_minor_formatter(FuncFormatter(  # within half a decade every minor tick, else 2s, 3s and 5s
        lambda v, _: _plain(v) if decades < 0.5 or round(v / 10 ** np.floor(np.log10(v))) in (2, 3, 5) else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")

    fig.canvas.draw()  # fixes the axis limits, which the places and label sizes depend on
    to_axes = ax.transData + ax.transAxes.inverted()
    places = {}  # points within 1% of the axes of each other: one place, one label
    for r, p in zip(rows, points):
        fx, fy = to_axes.transform(p)
        near = next((q for q in places if abs(q[0] - fx) < 0.01 and abs(q[1] - fy) < 0.01), (fx, fy))
        places.setdefault(near, (p, []))[1].append(r["variant"])
    renderer = fig.canvas.get_renderer()
    placed = []
    for (x, y), names in sorted(places.values(), key=lambda v: -v[0][1]):  # top first, labels move down
        label = ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for _ in range(3 * len(places)):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.xyann = (5, label.xyann[1] - 9)
        placed.append(label.get_window_extent(renderer))
    return fig


def plot_tradeoff(rows, key, xlabel, path, scale=1.0):
    """tradeoff_figure as a PNG at `path`."""
    return save_figure(tradeoff_figure(rows, key, xlabel, scale), path)


def plot_training_curves(history, path):
    """Loss and accuracy per epoch, train and validation."""
    epochs = [int(r["epoch"]) + 1 for r in history]
    fig = Figure(figsize=(9, 3.5))
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [r.get(prefix + metric) for r in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", label=(prefix or "train_") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def attention_figure(weights, tokens, block):
    """Heatmaps of one block's attention [H, L, L] (rows: queries, columns: keys), one panel per head."""
    heads, length = weights.shape[0], weights.shape[-1]  # the first `length` tokens: what the encoder reads
    tokens = tokens[:length]
    cols = min(heads, 2)
    rows = -(-heads // cols)
    side = max(3.0, 0.16 * length + 1.0)
    fig = Figure(figsize=(cols * side, rows * side))
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        im = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ticks = np.arange(length)
        font = 8 if length <= 40 else 6
        ax.set_xticks(ticks, tokens, rotation=90, fontsize=font)
        ax.set_yticks(ticks, tokens, fontsize=font)
        ax.set_title(f"block {block}, head {h}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()
