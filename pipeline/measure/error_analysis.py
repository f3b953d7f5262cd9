"""The report's error analysis of the shipped variant on dev: its most confidently wrong examples with the words
that drove them (attribution.py), accuracy by length, per-class precision and recall; and TensorBoard examples."""
import html
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json
from pipeline.measure.attribution import STEPS, explain_texts, load_explainer, record
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.plots import attention_figure, png_bytes
from pipeline.measure.predictors import load_predictor
from pipeline.measure.tables import html_table, markdown_table
from pipeline.text.processed import processed_dir
from pipeline.text.read import read_examples

SPECIAL = ("[CLS]", "[SEP]", "[PAD]")
WRONG_EXAMPLES = 20  # most confidently wrong dev examples in the report
TOP_TOKENS = 5  # attributed tokens shown per wrong example
TENSORBOARD_EXAMPLES = 4  # fixed dev examples in runs/<RUN>/explain: the first of each class, at most this many
LENGTH_EDGES = (8, 16, 32, 64, 128, 256, 512)  # wordpiece-count buckets: 0-8, 9-16, ...


def length_buckets(lengths, correct):
    """Accuracy by wordpiece count: [{"bucket": "9-16", "n", "accuracy"}] over LENGTH_EDGES (0-8, 9-16, ...,
    and "513+"), empty buckets left out."""
    lengths, correct = np.asarray(lengths), np.asarray(correct, bool)
    bounds = [(0, LENGTH_EDGES[0])] + list(zip(np.add(LENGTH_EDGES[:-1], 1), LENGTH_EDGES[1:]))
    bounds.append((LENGTH_EDGES[-1] + 1, None))
    out = []
    for low, high in bounds:
        in_bucket = (lengths >= low) & (lengths <= (high if high is not None else np.inf))
        if in_bucket.any():
            out.append({"bucket": f"{low}-{high}" if high is not None else f"{low}+", "n": int(in_bucket.sum()),
                        "accuracy": float(correct[in_bucket].mean())})
    return out


def words(tokens, attributions):
    """[(word, attribution)]: wordpieces joined into words ("##" pieces onto the one before), attributions
    summed (they are additive); [CLS], [SEP] and [PAD] left out."""
    out = []
    for t, a in zip(tokens, attributions):
        if t in SPECIAL:
            continue
        if t.startswith("##") and out:
            out[-1] = (out[-1][0] + t[2:], out[-1][1] + a)
        else:
            out.append((t, a))
    return out


def top_words(rec, k=TOP_TOKENS):
    """The k words with the largest attribution toward the explained class."""
    return sorted(words(rec["tokens"], rec["attributions"]), key=lambda p: -p[1])[:k]


def error_analysis(predictor, explainer, texts, labels, steps=STEPS):
    """`predictor` (the shipped .tflite) on labelled texts: its most confidently wrong examples with the
    attributions `explainer` (the Keras model it came from) gives toward the wrong class, its accuracy by
    length and per-class precision/recall."""
    ids = {label: i for i, label in enumerate(predictor.labels)}
    unknown = sorted(set(labels) - set(ids))
    if unknown:
        raise PipelineError(f"dev labels {', '.join(unknown)} are not the model's ({', '.join(predictor.labels)})")
    y = np.array([ids[label] for label in labels])
    probs = predictor.predict_proba(texts)
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:WRONG_EXAMPLES]
    encoded = explainer.encode(texts)
    lengths = encoded["input_mask"].sum(axis=1) - 2
    rows = []
    for i in wrong:
        result = explainer.explain({k: v[i] for k, v in encoded.items()}, int(pred[i]), steps)
        rec = record(explainer, texts[i], result, steps)
        rows.append({"line": int(i) + 1, "text": texts[i], "label": predictor.labels[y[i]],
                     "predicted": predictor.labels[pred[i]], "probability": float(probs[i, pred[i]]),
                     "top_words": [[t, round(a, 4)] for t, a in top_words(rec)]})
    metrics = classification_metrics(y, probs, predictor.labels)
    return {"accuracy": metrics["accuracy"], "most_confident_errors": rows,
            "accuracy_by_length": length_buckets(lengths, pred == y),
            "per_class": {k: {m: v[m] for m in ("precision", "recall", "support")}
                          for k, v in metrics["per_class"].items()}}


def _tables(analysis):
    """(errors, length, per-class) tables as lists of rows of strings, header first."""
    errors = [["probability", "true", "predicted", "text", "top words toward the prediction"]]
    for r in analysis["most_confident_errors"]:
        text = " ".join(r["text"].split())
        errors.append([f"{r['probability']:.3f}", r["label"], r["predicted"],
                       text[:100] + ("…" if len(text) > 100 else ""),
                       ", ".join(f"{t} ({a:+.2f})" for t, a in r["top_words"])])
    length = [["wordpieces", "examples", "accuracy %"]]
    length += [[b["bucket"], str(b["n"]), f"{100 * b['accuracy']:.2f}"] for b in analysis["accuracy_by_length"]]
    per_class = [["class", "precision", "recall", "support"]]
    per_class += [[k, f"{v['precision']:.4f}", f"{v['recall']:.4f}", str(v["support"])]
                  for k, v in analysis["per_class"].items()]
    return errors, length, per_class


def render_section(analysis, variant):
    """An error analysis as the report's (Markdown lines, HTML)."""
    errors, length, per_class = _tables(analysis)
    intro = (f"Dev predictions of **{variant}** (accuracy {100 * analysis['accuracy']:.2f}%). The "
             f"{len(errors) - 1} most confidently wrong examples, each with the {TOP_TOKENS} words (wordpieces "
             "joined, their attributions summed) that most raise the wrongly predicted class's logit: integrated "
             "gradients of the Transformer part plus the n-gram term's exact share, computed on the Keras model "
             "the variant was exported from. `python -m pipeline explain` shows any text in full.")
    md = ["## Error analysis (dev set)", "", intro, "", markdown_table(errors), "", "Accuracy by text length:", "",
          markdown_table(length), "", "Per class:", "", markdown_table(per_class), ""]
    page = (f"<h2>Error analysis (dev set)</h2><p>{html.escape(intro).replace('**', '')}</p>{html_table(errors)}"
            f"<p>Accuracy by text length:</p>{html_table(length)}<p>Per class:</p>{html_table(per_class)}")
    return md, page


def report_section(cfg, run, model_dir, variant):
    """The report's error analysis of the .tflite `variant` (also written to report/error_analysis.json) as
    (Markdown lines, HTML), and TensorBoard examples in runs/<run>/explain."""
    dev = processed_dir(cfg, run) / "dev.jsonl"
    if not dev.is_file():  # the run's processed data was deleted or moved: the rest of the report stands
        why = f"Error analysis: none, the run's dev split {dev} is missing (`make data` writes it)."
        return (["## Error analysis (dev set)", "", why, ""],
                f"<h2>Error analysis (dev set)</h2><p>{html.escape(why)}</p>")
    texts, labels = read_examples(dev, cfg.data)
    tflite = Path(model_dir) / "tflite" / f"{variant}.tflite"
    explainer, note = load_explainer(tflite)
    analysis = {"variant": variant, "data": str(dev), "explained_with": note,
                **error_analysis(load_predictor(tflite), explainer, texts, labels)}
    write_json(Path(model_dir) / "report" / "error_analysis.json", analysis)
    log_examples(Path(cfg.paths.runs) / run / "explain", explainer, texts, labels)
    return render_section(analysis, variant)


def log_examples(log_dir, explainer, texts, labels, steps=STEPS):
    """TensorBoard in log_dir: attention heatmaps and attributions of the first text of each class (at most
    TENSORBOARD_EXAMPLES)."""
    firsts = {}
    for text, label in zip(texts, labels):
        firsts.setdefault(label, text)
    chosen = list(firsts.items())[:TENSORBOARD_EXAMPLES]
    records = explain_texts(explainer, [text for _, text in chosen], steps=steps)
    log_dir = Path(log_dir)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for i, ((label, _), rec) in enumerate(zip(chosen, records)):
            ig = rec["integrated_gradients"]
            lines = [f"**{rec['text']}**", "", f"true {label}, predicted {rec['label']} ({rec['probability']:.3f}), "
                     f"attributions toward {rec['class']}; completeness "
                     f"gap of integrated gradients {ig['completeness_gap']:+.2e}", "",
                     "| token | total | Transformer (IG) | n-grams |", "|---|---|---|---|"]
            ng = rec["ngrams"]["attributions"] if rec["ngrams"] else [0.0] * len(rec["tokens"])
            lines += [f"| `{t}` | {a:+.4f} | {g:+.4f} | {n:+.4f} |"
                      for t, a, g, n in zip(rec["tokens"], rec["attributions"], ig["attributions"], ng)]
            tf.summary.text(f"explain/example_{i}", "\n".join(lines), step=0)
            for b, w in enumerate(rec["attention"]):
                png = png_bytes(attention_figure(np.asarray(w), rec["tokens"], b))
                tf.summary.image(f"explain/example_{i}_block_{b}", tf.image.decode_png(png, channels=4)[None], step=0)
    writer.flush()
    writer.close()
    return records
