"""Explain stage: token attributions (integrated gradients plus the exact n-gram term), attention maps, and
the error analysis and TensorBoard examples of the report.

The model's logit of a class is the Transformer's logit plus the n-gram term's (pipeline/model.py). Integrated
gradients explains the Transformer part: it integrates the gradient along a straight path from a baseline to
the text's token embeddings, and by completeness its attributions sum to that part's change from the baseline
(up to the Riemann error the report states). The n-gram term does not depend on the embeddings; it is a linear
model of TF-IDF n-gram features, so each feature's term (value x weight) is split evenly over its wordpieces,
which sums exactly to the n-gram logit minus its bias.
"""
import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.model import ngram
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_bytes, write_json, write_text

STEPS = 50  # integrated-gradients intervals (trapezoidal rule)
CONSISTENCY_TOLERANCE = 1e-3  # largest |logit| difference between explain's forward pass and the model's
PATH_CHUNK_ELEMENTS = 1 << 24  # attention-matrix entries per chunk of path points (bounds memory at long seq_len)
SPECIAL = ("[CLS]", "[SEP]", "[PAD]")
WRONG_EXAMPLES = 20  # most confidently wrong dev examples in the report
TOP_TOKENS = 5  # attributed tokens shown per wrong example
TENSORBOARD_EXAMPLES = 4  # fixed dev examples in runs/<RUN>/explain: the first of each class, at most this many
LENGTH_EDGES = (8, 16, 32, 64, 128, 256, 512)  # wordpiece-count buckets: 0-8, 9-16, ...
IG_EXPLAINS = ("the Transformer part of the class logit (the model's logit minus the n-gram term); baseline: "
               "every real token's embedding replaced by the [PAD] embedding, the input mask unchanged")
NGRAM_EXPLAINS = ("the n-gram term of the class logit minus its bias; each n-gram feature's term (TF-IDF value "
                  "x weight) split evenly over its wordpieces, exact")


# ---------------------------------------------------------------- which Keras model


def keras_source(tflite_path):
    """(model directory, reason) of the Keras model a .tflite file was exported from: distilled_* from
    <run>/distilled, mobile/model.tflite from the variant of tflite/ it is a copy of, else the model
    directory beside it or one level up."""
    path = Path(tflite_path)
    name = path.stem
    if path.parent.name == "mobile":  # the report copies the shipped variant's bytes unchanged
        data = path.read_bytes()
        twin = next((p for p in sorted((path.parent.parent / "tflite").glob("*.tflite"))
                     if p.stat().st_size == len(data) and p.read_bytes() == data), None)
        if twin is not None:
            name, path = twin.stem, twin
    candidates = [path.parent, path.parent.parent]
    if name.startswith("distilled_"):
        candidates = [path.parent.parent / "distilled", path.parent / "distilled"]
    for folder in candidates:
        if (folder / "model.keras").is_file():
            return folder, f"{tflite_path} is explained through the Keras model it was exported from, " \
                           f"{folder / 'model.keras'} (the .tflite's quantized weights can shift its probabilities)"
    raise PipelineError(f"{tflite_path}: no Keras model it came from (model.keras in "
                        f"{' or '.join(str(c) for c in candidates)}); explain needs the Keras model")


def load_explainer(path):
    """An Explainer for a model directory, its model.keras or a .tflite file; (explainer, note or None)."""
    from pipeline.core import manifest

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found; expected a trained model directory (with model.keras) or a "
                            ".tflite file")
    if path.is_dir() and (path / "model.joblib").is_file():
        raise PipelineError(f"{path}: the bag-of-words baseline; explain works on the Transformer model")
    note = None
    if path.is_file() and path.suffix == ".keras":
        path = path.parent
    elif path.is_file():
        from pipeline.stages.evaluate import EXPECTED

        with open(path, "rb") as f:  # a FlatBuffer's file identifier, as evaluate checks it
            if f.read(8)[4:8] != b"TFL3":
                raise PipelineError(f"{path}: not a TFLite model; {EXPECTED}")
        path, note = keras_source(path)
    manifest.verify_if_listed(path)
    return Explainer(path), note


# ---------------------------------------------------------------- the model, piece by piece


class Explainer:
    """A trained model directory, run layer by layer: the Transformer logits as a function of the token
    embedding rows (for integrated gradients), each block's attention weights, and the n-gram term."""

    def __init__(self, model_dir):
        from pipeline.stages.evaluate import KerasPredictor
        from pipeline.model.layers import EncoderBlock
        from pipeline.text.tokenizer import load_vocabulary

        self.predictor = KerasPredictor(model_dir)
        self.path, self.labels, self.seq_len = Path(model_dir), self.predictor.labels, self.predictor.seq_len
        self.vocab = load_vocabulary(self.path / "vocab.txt")
        model = self.predictor.model
        layers = {layer.name: layer for layer in model.layers}
        missing = [n for n in ("token_ids", "padding_mask", "embedding", "pooling", "probabilities")
                   if n not in layers]
        if missing:
            raise PipelineError(f"{self.path / 'model.keras'}: no layer {', '.join(missing)}; explain works on "
                                "liteformer's Transformer classifier")
        self.token_ids, self.padding_mask = layers["token_ids"], layers["padding_mask"]
        # a pre-LN encoder ends with a final LayerNorm; a backbone's post-LN blocks end normalised
        self.embedding, self.final_norm = layers["embedding"], layers.get("final_norm", lambda x: x)
        self.pooling, self.head = layers["pooling"], layers["probabilities"]
        self.blocks = [layer for layer in model.layers if isinstance(layer, EncoderBlock)]
        self.ngrams = layers.get("ngrams")
        # the n-gram term's own (uncut) ids and mask when the encoder reads only a text's first wordpieces
        self.ngram_ids = layers.get("ngram_token_ids", self.token_ids)
        self.ngram_mask = layers.get("ngram_padding_mask", self.padding_mask)
        self._logits_model = None  # the model's own logits, built on first use

    def model_logits(self, inputs):
        """The model's own logits [1, C] for one encoded text (dict of [T] arrays)."""
        from pipeline.model.layers import logits_model

        if self._logits_model is None:
            self._logits_model = logits_model(self.predictor.model)
        batch = {k: np.asarray(v)[None] for k, v in inputs.items()}
        return np.asarray(self._logits_model(batch, training=False), np.float64)

    def encode(self, texts):
        from pipeline.text.tokenizer import encode

        return encode(self.predictor.tokenizer, list(texts), self.seq_len)

    def transformer_logits(self, vectors, mask, attention=False):
        """Token embedding rows [B, T, d] and float mask [B, T] -> Transformer logits [B, C] (and with
        `attention` each block's weights [B, H, T, T])."""
        x = self.embedding.from_token_vectors(vectors, training=False)
        weights = []
        for block in self.blocks:
            x, w = block([x, mask], training=False, return_attention=True)
            weights.append(w)
        logits = self.head(self.pooling([self.final_norm(x), mask]), logits=True)
        return (logits, weights) if attention else logits

    def ngram_logits(self, ids, mask):
        """The n-gram term's logits [B, C] (zeros without one)."""
        import tensorflow as tf

        if self.ngrams is None:
            return tf.zeros([tf.shape(ids)[0], len(self.labels)], tf.float32)
        return self.ngrams([ids, mask])

    def explain(self, inputs, target=None, steps=STEPS):
        """One encoded text (dict of int32 [T] arrays) -> dict of NumPy results: probabilities, the target
        class, IG attributions of the Transformer part, n-gram attributions and attention, all over T."""
        import tensorflow as tf

        if steps < 1:
            raise PipelineError(f"--steps must be at least 1, got {steps}")
        ids = self.token_ids(tf.constant(inputs["input_word_ids"][None]))
        mask = self.padding_mask(tf.constant(inputs["input_mask"][None]))
        rows = self.embedding.token_vectors(ids)  # [1, T, d]
        # baseline: the [PAD] row at every position; padded positions hold it already
        baseline = self.embedding.token_vectors(tf.zeros_like(ids))
        z_t, attention = self.transformer_logits(rows, mask, attention=True)
        z_n = self.ngram_logits(self.ngram_ids(tf.constant(inputs["input_word_ids"][None])),
                                self.ngram_mask(tf.constant(inputs["input_mask"][None])))
        z_model = self.model_logits(inputs)  # as a check of the layer-by-layer pass
        difference = float(np.max(np.abs((z_t + z_n).numpy() - z_model)))
        if difference > CONSISTENCY_TOLERANCE:
            raise PipelineError(f"{self.path / 'model.keras'}: explain's layer-by-layer logits differ from the "
                                f"model's by {difference:.2g}; its layers are not connected as explain expects")
        logits = z_model[0]
        probs = _softmax(logits)
        target = int(np.argmax(probs)) if target is None else int(target)

        alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
        weights = np.full(steps + 1, 1.0 / steps, np.float32)
        weights[[0, -1]] /= 2  # trapezoidal rule
        length = int(rows.shape[1])
        heads = max([b.num_heads for b in self.blocks] or [1])
        chunk = max(1, PATH_CHUNK_ELEMENTS // (heads * length * length))
        grad = tf.zeros_like(rows[0])
        for start in range(0, steps + 1, chunk):
            a = tf.constant(alphas[start:start + chunk])[:, None, None]
            with tf.GradientTape() as tape:
                path = baseline + a * (rows - baseline)  # [k, T, d]
                tape.watch(path)
                out = self.transformer_logits(path, tf.repeat(mask, tf.shape(a)[0], axis=0))[:, target]
            g = tape.gradient(out, path)
            grad += tf.reduce_sum(g * tf.constant(weights[start:start + chunk])[:, None, None], axis=0)
            if start == 0:
                z_base = float(out[0])
        ig = tf.reduce_sum((rows[0] - baseline[0]) * grad, axis=-1).numpy().astype(np.float64)
        ig = np.pad(ig, (0, len(inputs["input_word_ids"]) - len(ig)))  # wordpieces past the encoder's reach: 0
        ig_ngrams = (self.ngram_attributions(inputs["input_word_ids"], inputs["input_mask"], target)
                     if self.ngrams is not None else None)
        return {"probs": probs, "logits": logits, "target": target, "ids": inputs["input_word_ids"],
                "mask": inputs["input_mask"], "ig": ig, "transformer_logit": float(z_t[0, target]),
                "transformer_baseline_logit": z_base, "ngram": ig_ngrams,
                "ngram_logit": float(z_n[0, target]), "attention": [w.numpy()[0] for w in attention]}

    def ngram_attributions(self, ids, mask, target):
        """Per-token share [T] of the n-gram logit of `target` minus its bias: each n-gram occurrence's term
        share x weight x the order's L2 scale (as NgramLogits computes it), split evenly over its n wordpieces."""
        layer = self.ngrams
        table, idf = layer.table.numpy()[:, target].astype(np.float64), layer.idf.numpy().astype(np.float64)
        ids = np.clip(np.asarray(ids, np.int64), 0, layer.vocab_size - 1)[None]
        out = np.zeros(ids.shape[1])
        for n, (rows, valid) in enumerate(ngram.hashed_ngrams(ids, np.asarray(mask)[None], layer.vocab_size,
                                                               layer.order, layer.buckets), start=1):
            positions = np.flatnonzero(valid[0])
            if not len(positions):
                continue
            r = rows[0, positions]
            _, inverse, counts = np.unique(r, return_inverse=True, return_counts=True)
            sublinear = 1.0 + np.log(counts[inverse])
            share = sublinear / counts[inverse]
            scale = 1.0 / np.sqrt(max(np.sum(share * sublinear * idf[r] ** 2), 1.0))
            for p, term in zip(positions, share * table[r] * scale):
                out[p:p + n] += term / n
        return out


def _softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


# ---------------------------------------------------------------- records


def record(explainer, text, result, steps, note=None, attention_digits=4):
    """The JSON-ready explanation of one text: real tokens only (padding carries no attribution)."""
    real = np.flatnonzero(np.asarray(result["mask"]) != 0)
    tokens = [explainer.vocab[i] if 0 <= i < len(explainer.vocab) else "[UNK]" for i in result["ids"][real]]
    labels, target, probs = explainer.labels, result["target"], result["probs"]
    ig = result["ig"][real]
    rec = {"text": text, "label": labels[int(np.argmax(probs))], "probability": float(np.max(probs)),
           "class": labels[target], "class_probability": float(probs[target]), "tokens": tokens,
           "truncated": bool(len(real) == explainer.seq_len and truncated(explainer, text)),
           "attributions": None,
           "integrated_gradients": {
               "explains": IG_EXPLAINS, "steps": int(steps), "attributions": [float(v) for v in ig],
               "logit": result["transformer_logit"], "baseline_logit": result["transformer_baseline_logit"],
               "sum": float(ig.sum()),
               "completeness_gap": float(ig.sum() - (result["transformer_logit"]
                                                       - result["transformer_baseline_logit"]))},
           "ngrams": None}
    total = ig.copy()
    if result["ngram"] is not None:
        ng = result["ngram"][real]
        bias = float(explainer.ngrams.bias.numpy()[target])
        total += ng
        rec["ngrams"] = {"explains": NGRAM_EXPLAINS, "attributions": [float(v) for v in ng],
                         "logit": result["ngram_logit"], "bias": bias, "sum": float(ng.sum()),
                         "completeness_gap": float(ng.sum() - (result["ngram_logit"] - bias))}
    rec["attributions"] = [float(v) for v in total]
    rec["logit"] = float(result["logits"][target])
    # what the attributions together account for: the logit minus its value at the baseline input (the
    # Transformer's there, plus the n-gram bias, which no token moves)
    rec["baseline_logit"] = rec["logit"] - (result["transformer_logit"] - result["transformer_baseline_logit"]) - (
        result["ngram_logit"] - (rec["ngrams"]["bias"] if rec["ngrams"] else 0.0))
    rec["completeness_gap"] = float(total.sum() - (rec["logit"] - rec["baseline_logit"]))
    # over the wordpieces the encoder reads (a long text's first model.max_encoder_len)
    rec["attention"] = [np.round(w[:, seen][:, :, seen], attention_digits).tolist()
                        for w in result["attention"] for seen in [real[real < w.shape[-1]]]]
    if note:
        rec["note"] = note
    return rec


def truncated(explainer, text):
    """True when the text has more wordpieces than the model's sequence length holds."""
    import tensorflow as tf

    from pipeline.text.tokenizer import CHARS_PER_TOKEN, wordpiece_ids

    ids = wordpiece_ids(explainer.predictor.tokenizer, tf.constant([text]), explainer.seq_len * CHARS_PER_TOKEN)
    return int(ids.row_lengths()[0]) > explainer.seq_len - 2


def explain_texts(explainer, texts, target=None, steps=STEPS, note=None):
    """Records (see `record`) of every text, each for its predicted class or the class id `target`."""
    inputs = explainer.encode(texts)
    out = []
    for i, text in enumerate(texts):
        result = explainer.explain({k: v[i] for k, v in inputs.items()}, target, steps)
        out.append(record(explainer, text, result, steps, note))
    return out


# ---------------------------------------------------------------- pictures and the page


def attention_figure(weights, tokens, block):
    """Heatmaps of one block's attention [H, L, L] (rows: queries, columns: keys), one panel per head."""
    from matplotlib.figure import Figure

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
        from pipeline.stages.evaluate import load_predictor

        lite = load_predictor(model_path)
        for rec, p in zip(records, lite.predict_proba(texts)):
            rec["tflite"] = {"label": lite.labels[int(np.argmax(p))], "probability": float(np.max(p))}
    for rec in records:
        print(json.dumps(rec), flush=True)
    if out_dir is not None:
        page = write_outputs(out_dir, records, model_path)
        print(f"explain: {page}", file=sys.stderr, flush=True)
    return records


# ---------------------------------------------------------------- report: error analysis, TensorBoard


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
    from pipeline.stages.evaluate import classification_metrics

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
    from pipeline.stages.report import _html_table, markdown_table

    errors, length, per_class = _tables(analysis)
    intro = (f"Dev predictions of **{variant}** (accuracy {100 * analysis['accuracy']:.2f}%). The "
             f"{len(errors) - 1} most confidently wrong examples, each with the {TOP_TOKENS} words (wordpieces "
             "joined, their attributions summed) that most raise the wrongly predicted class's logit: integrated "
             "gradients of the Transformer part plus the n-gram term's exact share, computed on the Keras model "
             "the variant was exported from. `python -m pipeline explain` shows any text in full.")
    md = ["## Error analysis (dev set)", "", intro, "", markdown_table(errors), "", "Accuracy by text length:", "",
          markdown_table(length), "", "Per class:", "", markdown_table(per_class), ""]
    page = (f"<h2>Error analysis (dev set)</h2><p>{html.escape(intro).replace('**', '')}</p>{_html_table(errors)}"
            f"<p>Accuracy by text length:</p>{_html_table(length)}<p>Per class:</p>{_html_table(per_class)}")
    return md, page


def report_section(cfg, run, model_dir, variant):
    """The report's error analysis of the .tflite `variant` (also written to report/error_analysis.json) as
    (Markdown lines, HTML), and TensorBoard examples in runs/<run>/explain."""
    from pipeline.stages.data import processed_dir, read_examples
    from pipeline.stages.evaluate import load_predictor

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
    import tensorflow as tf

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
