"""TFLite export with cheap generation: a `prefill` signature (a whole window -> logits and every layer's keys
and values) and a `decode` signature (one token + the cache -> its logits and the cache with its keys and
values written in), so a generated token costs one position of work, not a re-run of the window. With a
hashed n-gram term the decode step also takes the last order-1 tokens (`tokens`, the one decoded last).

CachedLM computes both from the Keras model's own weights with the blocks' math (pre-LN, clipped scores, the
same masking constants), so its logits equal the Keras model's; tests check that, and check_parity checks the
converted file against Keras. Caches are float32 [num_layers, 1, num_heads, context, head_dim].
"""
import math
import tempfile

import numpy as np
import tensorflow as tf

from pipeline.model.encoder import _PAD_LOGIT, _SCORE_LIMIT
from pipeline.model.layers import layer_norm as _layer_norm

MODES = ("float32", "dynamic_range", "float16", "int8")


class CachedLM(tf.Module):
    """prefill / decode tf.functions over a float32 build_lm model's layers (batch 1, fixed context)."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_layer("embedding")
        self.blocks = [layer for layer in model.layers if layer.name.startswith("block_")]
        self.norm = model.get_layer("final_norm")
        names = [layer.name for layer in model.layers]
        self.ngram = model.get_layer("ngram_logits") if "ngram_logits" in names else None
        self.recent = self.ngram.order - 1 if self.ngram else 1  # tokens the decode step reads
        self.context, self.vocab_size = self.embed.max_len, self.embed.vocab_size
        first = self.blocks[0]
        self.heads, self.head_dim = first.num_heads, first.d_model // first.num_heads
        cache = tf.TensorSpec([len(self.blocks), 1, self.heads, self.context, self.head_dim], tf.float32)
        self.prefill = tf.function(self._prefill, input_signature=[
            tf.TensorSpec([1, self.context], tf.int32, name="input_ids")])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([1, self.recent], tf.int32, name="tokens"), tf.TensorSpec([1], tf.int32, name="position"),
            tf.TensorSpec.from_spec(cache, name="k_cache"), tf.TensorSpec.from_spec(cache, name="v_cache")])

    def _embed(self, ids, positions):
        e = self.embed
        x = tf.gather(e._weight("embeddings"), tf.clip_by_value(ids, 0, e.vocab_size - 1)) * math.sqrt(e.d_model)
        table = e.position_embeddings if e.position == "learned" else tf.constant(e._table)
        return x + tf.reshape(tf.gather(table, positions), [1, -1, e.d_model])

    def _qkv(self, block, x):
        """x [1, T, d] -> query, key, value [1, H, T, head_dim] of block's attention (on LN1(x))."""
        y = _layer_norm(x, block._weight("ln1_gamma"), block._weight("ln1_beta"), block.epsilon)
        y = tf.reshape(y, [-1, block.d_model])

        def heads(t):
            return tf.transpose(tf.reshape(t, [1, -1, self.heads, self.head_dim]), [0, 2, 1, 3])
        q = block._dense(y, "q") * self.head_dim ** -0.5
        return heads(q), heads(block._dense(y, "k")), heads(block._dense(y, "v"))

    def _attend_ffn(self, block, x, q, k, v, keys):
        """The rest of the block: attention of q over k, v (keys: 1 = visible) then the feed-forward net."""
        limit = block.score_limit
        scores = tf.clip_by_value(tf.matmul(q, k, transpose_b=True), -limit, limit)
        scores = scores * keys + (1.0 - keys) * (_PAD_LOGIT / _SCORE_LIMIT * limit)
        ctx = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
        ctx = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [-1, block.d_model])
        x = x + tf.reshape(block._dense(ctx, "o"), tf.shape(x))
        y = _layer_norm(x, block._weight("ln2_gamma"), block._weight("ln2_beta"), block.epsilon)
        y = tf.keras.activations.get(block.activation)(block._dense(tf.reshape(y, [-1, block.d_model]), "ff1"))
        return x + tf.reshape(block._dense(y, "ff2"), tf.shape(x))

    def _logits(self, x):
        x = _layer_norm(x, self.norm._weight("gamma"), self.norm._weight("beta"), self.norm.epsilon)
        return tf.matmul(tf.reshape(x, [-1, self.embed.d_model]), self.embed._weight("embeddings"), transpose_b=True)

    def _prefill(self, input_ids):
        x = self._embed(input_ids, tf.range(self.context))
        keys = tf.linalg.band_part(tf.ones([self.context, self.context]), -1, 0)  # causal
        ks, vs = [], []
        for block in self.blocks:
            q, k, v = self._qkv(block, x)
            x = self._attend_ffn(block, x, q, k, v, keys)
            ks.append(k)
            vs.append(v)
        logits = tf.reshape(self._logits(x), [1, self.context, self.vocab_size])
        if self.ngram:
            logits += self.ngram.call(input_ids)
        return {"logits": logits, "k_cache": tf.stack(ks), "v_cache": tf.stack(vs)}

    def _decode(self, tokens, position, k_cache, v_cache):
        x = self._embed(tokens[:, -1:], position)
        slots = tf.range(self.context)
        keys = tf.reshape(tf.cast(slots <= position, tf.float32), [1, 1, 1, self.context])
        write = tf.reshape(tf.cast(tf.equal(slots, position), tf.float32), [1, 1, self.context, 1])
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, x)
            # The new key and value go into slot `position` (a select by mask: builtin ops, no scatter).
            k = k_cache[i] * (1.0 - write) + k * write
            v = v_cache[i] * (1.0 - write) + v * write
            x = self._attend_ffn(block, x, q, k, v, keys)
            ks.append(k)
            vs.append(v)
        logits = self._logits(x)
        if self.ngram:
            logits += self.ngram.call(tokens)[:, -1]
        return {"logits": logits, "k_cache": tf.stack(ks), "v_cache": tf.stack(vs)}

    def empty_cache(self):
        return np.zeros([len(self.blocks), 1, self.heads, self.context, self.head_dim], np.float32)

    def run_prefill(self, ids):
        return {k: v.numpy() for k, v in self.prefill(tf.constant(ids, tf.int32)).items()}

    def run_decode(self, tokens, position, k_cache, v_cache):
        """tokens: the text's tokens up to and including the one at `position` (the last `recent` are read)."""
        out = self.decode(recent_tokens(tokens, self.recent, self.vocab_size), tf.constant([position], tf.int32),
                          k_cache, v_cache)
        return {k: v.numpy() for k, v in out.items()}


def recent_tokens(tokens, recent, pad):
    """[1, recent] int32: the last `recent` tokens, left-padded with `pad` (the n-gram term's start id)."""
    tail = list(tokens)[-recent:]
    return np.array([[pad] * (recent - len(tail)) + tail], np.int32)


def _representative(cached, tokens, samples, seed):
    """Calibration for int8: prefill windows of real text, and decode steps at random positions with the
    caches those windows produce (yielded per signature, as the converter asks for several signatures)."""
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens, np.int32)
    starts = rng.integers(0, len(tokens) - cached.context, samples)

    def generate():
        for start in starts:
            ids = tokens[None, start:start + cached.context]
            out = cached.run_prefill(ids)
            yield "prefill", {"input_ids": ids}
            pos = int(rng.integers(1, cached.context))
            yield "decode", {"tokens": recent_tokens(ids[0, :pos + 1], cached.recent, cached.vocab_size),
                             "position": np.array([pos], np.int32),
                             "k_cache": out["k_cache"], "v_cache": out["v_cache"]}
    return generate


def export_tflite(model, mode, calibration_tokens=None, samples=64, seed=0):
    """.tflite bytes of a float32 build_lm model with prefill and decode signatures. mode: float32,
    dynamic_range (int8 weights, float activations), int8 (int8 weights and activations, calibrated on
    `calibration_tokens`; float32 inputs and outputs, builtin float kernels where int8 has none), float16
    (float16 weights, dequantized to float32 when the file is loaded: half the download, float32's speed)."""
    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}, expected one of {MODES}")
    cached = CachedLM(model)
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(cached, tmp, signatures={"prefill": cached.prefill.get_concrete_function(),
                                                     "decode": cached.decode.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["prefill", "decode"])
        if mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if mode == "int8":
            if calibration_tokens is None:
                raise ValueError("int8 export needs calibration tokens")
            converter.representative_dataset = _representative(cached, calibration_tokens, samples, seed)
        return converter.convert()


class LiteRTLM:
    """An exported LM file run by ai-edge-litert: the same prefill / decode calls as CachedLM."""

    def __init__(self, path, threads=1):
        from ai_edge_litert.interpreter import Interpreter  # LiteRT only when a .tflite file is run
        self.path = str(path)
        self.interpreter = Interpreter(model_path=self.path, num_threads=threads)
        signatures = self.interpreter.get_signature_list()
        if not {"prefill", "decode"} <= set(signatures):
            raise ValueError(f"{path}: not a language-model export (signatures {sorted(signatures)})")
        self._prefill = self.interpreter.get_signature_runner("prefill")
        self._decode = self.interpreter.get_signature_runner("decode")
        shapes = {k: v["shape"] for k, v in self._decode.get_input_details().items()}
        self.cache_shape = tuple(shapes["k_cache"])
        self.recent = int(shapes["tokens"][1])
        self.context = int(self.cache_shape[3])
        self.vocab_size = int(self._prefill.get_output_details()["logits"]["shape"][-1])

    def empty_cache(self):
        return np.zeros(self.cache_shape, np.float32)

    def run_prefill(self, ids):
        return self._prefill(input_ids=np.asarray(ids, np.int32))

    def run_decode(self, tokens, position, k_cache, v_cache):
        return self._decode(tokens=recent_tokens(tokens, self.recent, self.vocab_size),
                            position=np.array([position], np.int32), k_cache=k_cache, v_cache=v_cache)

    def window_logits(self, ids):
        return self.run_prefill(ids)["logits"]


def check_parity(model, path, tokens, tolerance, positions=8):
    """Largest |logit difference| between the Keras model and the .tflite file's prefill and its decode steps
    on one window of `tokens`; ValueError naming the file when it exceeds `tolerance`."""
    lm = LiteRTLM(path)
    ids = np.asarray(tokens[:lm.context], np.int32)[None]
    keras_logits = model(ids, training=False).numpy()[0]
    out = lm.run_prefill(ids)
    worst = float(np.abs(out["logits"][0] - keras_logits).max())
    # decode the last `positions` tokens again over the prefill's cache: each must give the window's logits
    k, v = out["k_cache"], out["v_cache"]
    for pos in range(lm.context - positions, lm.context):
        step = lm.run_decode(ids[0, :pos + 1], pos, k, v)
        k, v = step["k_cache"], step["v_cache"]
        worst = max(worst, float(np.abs(step["logits"][0] - keras_logits[pos]).max()))
    if worst > tolerance:
        raise ValueError(f"{path}: TFLite logits differ from Keras by {worst:.4f} (tolerance {tolerance})")
    return worst
