"""Explain stage (`python -m pipeline explain`): one JSON line per text with its tokens, each token's attribution
and the attention weights; with --out a self-contained explain.html and heatmap PNGs. The attributions are
computed in pipeline/measure/attribution.py, the report's error analysis in pipeline/measure/error_analysis.py."""
import base64
import html
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_bytes, write_text
from pipeline.measure.attribution import IG_EXPLAINS, NGRAM_EXPLAINS, STEPS, explain_texts, load_explainer
from pipeline.measure.plots import attention_figure, png_bytes
from pipeline.measure.predictors import load_predictor


def run_explain(cfg, model_path, texts, out_dir=None, label=None, steps=STEPS):
    """`python -m pipeline explain`: one JSON line per text; with out_dir also the page and heatmaps."""
    explainer, note = load_explainer(model_path)
    target = None
    if label is not None:
        if label not in explainer.labels:
            raise PipelineError(f"--class {label!r} is not one of the model's labels "
                                f"({', '.join(explainer.labels)})")
        target = explainer.labels.index(label)
    if note:
        print(f"explain: {note}", file=sys.stderr, flush=True)
    records = explain_texts(explainer, texts, target, steps, note)
    if note:  # what the .tflite itself predicts, beside the Keras model's explanation
        lite = load_predictor(model_path)
        for rec, p in zip(records, lite.predict_proba(texts)):
            rec["tflite"] = {"label": lite.labels[int(np.argmax(p))], "probability": float(np.max(p))}
    for rec in records:
        print(json.dumps(rec), flush=True)
    if out_dir is not None:
        page = write_outputs(out_dir, records, model_path)
        print(f"explain: {page}", file=sys.stderr, flush=True)
    return records


# ---------------------------------------------------------------- the page


def _shade(value, scale):
    """Background colour of a token: green for support of the class, red against, alpha by |value| / scale."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    colour = "0,150,60" if value >= 0 else "210,40,40"
    return f"rgba({colour},{alpha * 0.85:.3f})"


def token_row(tokens, values):
    """HTML spans: each token shaded by its attribution (scale: the row's largest |attribution|)."""
    scale = max([abs(v) for v in values] or [0.0])
    return "".join(f'<span class="tok" style="background:{_shade(v, scale)}" title="{v:+.4f}">'
                   f"{html.escape(t)}</span>" for t, v in zip(tokens, values))


def html_section(rec, images):
    """One text's explanation as HTML: the token rows, the completeness numbers and its heatmaps."""
    ig = rec["integrated_gradients"]
    rows = [("total", rec["attributions"]), ("integrated gradients (Transformer)", ig["attributions"])]
    if rec["ngrams"]:
        rows.append(("n-grams (exact)", rec["ngrams"]["attributions"]))
    facts = [f"predicted <b>{html.escape(rec['label'])}</b> ({rec['probability']:.3f}); attributions toward "
             f"<b>{html.escape(rec['class'])}</b> ({rec['class_probability']:.3f}): total "
             f"{sum(rec['attributions']):.4f}"
             f" = logit {rec['logit']:.4f} minus {rec['baseline_logit']:.4f} at the baseline (gap "
             f"{rec['completeness_gap']:+.2e})",
             f"integrated gradients ({ig['steps']} steps): sum {ig['sum']:.4f}, Transformer logit "
             f"{ig['logit']:.4f} against {ig['baseline_logit']:.4f} at the baseline: completeness gap "
             f"{ig['completeness_gap']:+.2e}. It explains {html.escape(IG_EXPLAINS)}."]
    if rec["ngrams"]:
        ng = rec["ngrams"]
        facts.append(f"n-grams: sum {ng['sum']:.4f} = logit {ng['logit']:.4f} minus bias {ng['bias']:.4f} "
                     f"(gap {ng['completeness_gap']:+.1e}). It explains {html.escape(NGRAM_EXPLAINS)}.")
    if rec.get("truncated"):
        facts.append("the text is longer than the model's sequence length; it saw only these tokens")
    if rec.get("note"):
        facts.append(html.escape(rec["note"]))
    table = "".join(f"<tr><th>{html.escape(name)}</th><td>{token_row(rec['tokens'], values)}</td></tr>"
                    for name, values in rows)
    imgs = "".join(f'<figure><img alt="attention of block {b}" src="data:image/png;base64,'
                   f'{base64.b64encode(data).decode("ascii")}"><figcaption>attention, block {b}</figcaption></figure>'
                   for b, data in enumerate(images))
    return (f"<section><h2>{html.escape(rec['text'])}</h2><ul>{''.join(f'<li>{f}</li>' for f in facts)}</ul>"
            f"<table>{table}</table>{imgs}</section>")


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em}.tok{display:inline-block;padding:2px 3px;margin:1px;"
              "border-radius:3px;font-family:monospace}th{text-align:left;padding-right:1em;vertical-align:top;"
              "font-weight:normal;color:#555}img{max-width:100%}section{border-top:1px solid #ccc;margin-top:1em}")


def html_page(title, sections):
    """A self-contained page (inline style, images as data URIs, no external resources)."""
    legend = ("<p>Green: the token raises the class's logit; red: lowers it; shading is relative to the row's "
              "largest attribution (hover for the number).</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{legend}"
            f"{''.join(sections)}</body></html>\n")


def write_outputs(out_dir, records, model_path):
    """out_dir/explain.html, explanations.jsonl and attention/text<i>_block<j>.png."""
    out_dir = Path(out_dir)
    sections = []
    for i, rec in enumerate(records):
        images = [png_bytes(attention_figure(np.asarray(w), rec["tokens"], b)) for b, w in enumerate(rec["attention"])]
        for b, data in enumerate(images):
            write_bytes(out_dir / "attention" / f"text{i}_block{b}.png", data)
        sections.append(html_section(rec, images))
    write_text(out_dir / "explain.html", html_page(f"liteformer explain: {model_path}", sections))
    write_text(out_dir / "explanations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return out_dir / "explain.html"
