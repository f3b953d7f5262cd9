"""Why a model predicts what it does: token attributions (integrated gradients plus the exact n-gram term) and
attention maps of a text, computed on the Keras model layer by layer.

The model's logit of a class is the Transformer's logit plus the n-gram term's (pipeline/model/ngram.py). Integrated
gradients explains the Transformer part: it integrates the gradient along a straight path from a baseline to
the text's token embeddings, and by completeness its attributions sum to that part's change from the baseline
(up to the Riemann error the report states). The n-gram term does not depend on the embeddings; it is a linear
model of TF-IDF n-gram features, so each feature's term (value x weight) is split evenly over its wordpieces,
which sums exactly to the n-gram logit minus its bias.
"""
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core import manifest
from pipeline.core.errors import PipelineError
from pipeline.measure.predictors import EXPECTED, KerasPredictor
from pipeline.model import ngram
from pipeline.model.build import logits_model
from pipeline.model.encoder import EncoderBlock
from pipeline.text.tokenizer import CHARS_PER_TOKEN, encode, load_vocabulary, wordpiece_ids

STEPS = 50  # integrated-gradients intervals (trapezoidal rule)
CONSISTENCY_TOLERANCE = 1e-3  # largest |logit| difference between explain's forward pass and the model's
PATH_CHUNK_ELEMENTS = 1 << 24  # attention-matrix entries per chunk of path points (bounds memory at long seq_len)
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
        if self._logits_model is None:
            self._logits_model = logits_model(self.predictor.model)
        batch = {k: np.asarray(v)[None] for k, v in inputs.items()}
        return np.asarray(self._logits_model(batch, training=False), np.float64)

    def encode(self, texts):
        """Model inputs of `texts` (dict of int32 [n, seq_len] arrays)."""
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
        if self.ngrams is None:
            return tf.zeros([tf.shape(ids)[0], len(self.labels)], tf.float32)
        return self.ngrams([ids, mask])

    def explain(self, inputs, target=None, steps=STEPS):
        """One encoded text (dict of int32 [T] arrays) -> dict of NumPy results: probabilities, the target
        class, IG attributions of the Transformer part, n-gram attributions and attention, all over T."""
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
