"""The Transformer encoder classifier: small Keras layers, a functional model, TFMOT hooks, loading.

Model graph (a FUNCTIONAL tf.keras model, because TFMOT's prune_low_magnitude / quantize_apply clone
functional models layer by layer and refuse subclassed Models):

    input_word_ids -> ClipTokenIds -> TokenAndPositionEmbedding -+
    input_mask     -> PaddingMask ---------------+----------------+-> EncoderBlock x N -> LayerNorm
    input_type_ids   (an input for MediaPipe's BERT signature; unused by the math, still kept by TFLite)
                                                 +-> SequencePooling (masked mean or [CLS]) -> ClassifierHead
                                                                          (dense -> softmax, float32)

Design notes
* Pre-LN blocks (LayerNorm before attention and before the FFN, plus a final LayerNorm): the residual
  path is an identity, so gradients reach every layer unscaled; Pre-LN trains stably at 1e-3 with a
  short (or no) warmup, where Post-LN is sensitive to the learning rate and warmup length.
* GELU in the FFN (TFLite has a builtin GELU op, int8 included); "relu" is accepted by EncoderBlock.
* A convolution over each token's neighbours ahead of attention (model.conv_width, default 5): a
  from-scratch Transformer on SST-2 sized data has no notion of locality, and phrases ("not good")
  are local. It is one matmul over concatenated shifted copies, so TFLite runs it as FULLY_CONNECTED
  and TFMOT prunes and quantizes it like the other kernels.
* Masking: input_mask (1 = token, 0 = [PAD]) becomes a float mask once (PaddingMask). Attention
  scores are clipped to [-8, 8] and padded keys get the logit -24: their softmax weight is at most
  e^-16 of the largest real one (< 1e-6 in all), so real positions do not depend on how much padding
  follows. Not -1e9: every tensor on this path must keep a small range, or full-int8 quantization
  gives the scores a scale of ~4e6, rounds them all to 0 and makes attention uniform (seen with the
  TFLite QuantizationDebugger). Pooling averages over mask==1 only.
* Every block owns its weights (add_weight) and computes with plain tf ops: 2-D matmuls
  ([B*T, d] @ [d, d]) for projections (TFLite FULLY_CONNECTED), batch matmul for scores, softmax and
  LayerNorm in float32. Weights are read through `_weight(name)` and quantization points through
  `_point(name, x)`, so a QuantizeConfig can swap in fake-quantized tensors without nested Keras layers.
* Mixed precision: layers compute in `self.compute_dtype` and cast explicitly (TFMOT wrappers call
  `layer.call` directly, bypassing Keras' autocast); the head runs in float32.
* ClipTokenIds and PaddingMask exist so that no layer annotated for QAT consumes an int32 model input:
  quantize_apply puts a FakeQuant QuantizeLayer after every InputLayer that feeds an annotated layer,
  which fails on int32 ("Input 'inputs' of 'FakeQuantWithMinMaxVars' Op has type int32 that does not
  match expected type of float32"). ClipTokenIds also keeps out-of-range ids from crashing the gather.
"""
import contextlib
import math
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
# The prune-preserving weight quantizer is not exported by tfmot's public API (only the scheme is).
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
    cluster_preserve_quantize_registry)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
    prune_preserve_quantize_registry)

from pipeline import INPUT_NAMES
from pipeline.model import ngram
from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError

PACKAGE = "liteformer"
_SCORE_LIMIT = 8.0  # attention scores are clipped to [-8, 8] ...
_PAD_LOGIT = -24.0  # ... and padded keys get -24 (see "Masking" above)
# A pretrained BERT's blocks clip far wider: all-MiniLM-L6-v2's first layer has scores up to 67 on SST-2
# sentences, and a clip at 8 moves its pooled output by up to 0.14 (at 100: < 1e-6 from the reference).
BERT_SCORE_LIMIT = 100.0

_register = tf.keras.utils.register_keras_serializable(package=PACKAGE)
_quant = tfmot.quantization.keras.quantizers
_PrunePreserveQuantizer = prune_preserve_quantize_registry.PrunePreserveDefaultWeightsQuantizer
_ClusterPreserveQuantizer = cluster_preserve_quantize_registry.ClusterPreserveDefaultWeightsQuantizer


def sinusoidal_encoding(length: int, d_model: int) -> np.ndarray:
    """Positional encoding of "Attention Is All You Need", float32 [length, d_model].

    PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).
    """
    pos = np.arange(length, dtype=np.float64)[:, None]
    dims = np.arange(d_model)
    angles = pos / np.power(10000.0, (2 * (dims // 2)) / d_model)[None, :]
    table = np.where(dims % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def _layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, computed in float32 whatever the compute dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    y = centered * tf.math.rsqrt(var + epsilon) * tf.cast(gamma, tf.float32) + tf.cast(beta, tf.float32)
    return tf.cast(y, dtype)


class _Layer(tf.keras.layers.Layer, tfmot.sparsity.keras.PrunableLayer, tfmot.clustering.keras.ClusterableLayer):
    """Base of our layers: pruning, clustering (the prunable kernels) and quantization hooks.

    Subclasses list `_quantizable_weights()` (attribute names of kernels to fake-quantize) and
    `_quant_points()` (name -> activation applied at that point; fake-quantized under QAT), and
    read weights with `_weight(name)` and intermediate tensors with `_point(name, x)`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Transient overrides set by QuantizeConfig on every call of the QuantizeWrapper. Set with
        # object.__setattr__ so Keras does not track them (and does not untrack the variables).
        object.__setattr__(self, "_weight_overrides", {})
        object.__setattr__(self, "_point_overrides", {})

    def get_prunable_weights(self):
        return []

    def _quantizable_weights(self):
        return []

    def get_clusterable_weights(self):
        return [(w.name.split("/")[-1].split(":")[0], w) for w in self.get_prunable_weights()]

    def _quant_points(self):
        return {}

    def _weight(self, name):
        w = self._weight_overrides.get(name)
        if w is None:
            w = getattr(self, name)
        return tf.cast(w, self.compute_dtype)

    def _point(self, name, x):
        fn = self._point_overrides.get(name) or self._quant_points()[name]
        return fn(x)

    def _set_weight_overrides(self, mapping):
        object.__setattr__(self, "_weight_overrides", dict(mapping))

    def _set_point_overrides(self, mapping):
        object.__setattr__(self, "_point_overrides", dict(mapping))


# Identity at a quantization point; QuantizeAwareActivation fake-quantizes the output of "linear".
_linear = tf.keras.activations.linear


@_register
class ClipTokenIds(_Layer):
    """int32 ids -> ids clipped into [0, vocab_size): no out-of-range gather, and the int input stays
    away from QAT-annotated layers (see module docstring). keep > 0: only the first `keep` positions."""

    def __init__(self, vocab_size, keep=0, **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        self.vocab_size, self.keep = int(vocab_size), int(keep)

    def call(self, inputs):
        ids = inputs[:, :self.keep] if self.keep else inputs
        return tf.clip_by_value(tf.cast(ids, tf.int32), 0, self.vocab_size - 1)

    def compute_output_shape(self, input_shape):
        return _first_positions(input_shape, self.keep)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "keep": self.keep}


@_register
class PaddingMask(_Layer):
    """input_mask (1 = token, 0 = padding; any int or float dtype) -> float mask [B, T] in compute dtype.
    keep > 0: only the first `keep` positions."""

    def __init__(self, keep=0, **kwargs):
        super().__init__(**kwargs)
        self.keep = int(keep)

    def call(self, inputs):
        mask = inputs[:, :self.keep] if self.keep else inputs
        return tf.cast(tf.not_equal(mask, 0), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return _first_positions(input_shape, self.keep)

    def get_config(self):
        return {**super().get_config(), "keep": self.keep}


def _first_positions(input_shape, keep):
    shape = tf.TensorShape(input_shape)
    if not keep or shape[1] is None:
        return shape if not keep else tf.TensorShape([shape[0], None])
    return tf.TensorShape([shape[0], min(keep, shape[1])])


@_register
class TokenAndPositionEmbedding(_Layer):
    """ids [B, T] -> embeddings * sqrt(d_model) + position encoding [B, T, d_model], then dropout.

    position: "sinusoidal" (fixed table, not a weight) or "learned" (a [max_len, d_model] weight).
    token_dropout: in training, the fraction of whole word embeddings zeroed (word dropout), so the
    classifier cannot lean on any single word. T must be <= max_len.
    vector_dim > 0: each token's fixed pretrained vector ([vocab_size, vector_dim], not trained; see
    pipeline/vectors.py) times a trained projection is added to its embedding. embedded_tokens: only ids below
    it have an embedding (the learned vocabulary); the words added for their vectors have the vector alone.
    scale=False, norm_epsilon > 0: BERT's embedding (no sqrt(d_model) factor, a LayerNorm after the sum).
    """

    def __init__(self, vocab_size, d_model, max_len, position="sinusoidal", dropout=0.0, token_dropout=0.0,
                 vector_dim=0, embedded_tokens=0, scale=True, norm_epsilon=0.0, **kwargs):
        super().__init__(**kwargs)
        if position not in ("sinusoidal", "learned"):
            raise ValueError(f"position must be 'sinusoidal' or 'learned', got {position!r}")
        self.vocab_size = int(vocab_size)
        self.d_model = int(d_model)
        self.max_len = int(max_len)
        self.position = position
        self.dropout = float(dropout)
        self.token_dropout = float(token_dropout)
        self.vector_dim = int(vector_dim)
        self.embedded_tokens = int(embedded_tokens) or self.vocab_size
        self.scale = bool(scale)
        self.norm_epsilon = float(norm_epsilon)
        self._dropout = tf.keras.layers.Dropout(self.dropout)
        self._token_dropout = tf.keras.layers.Dropout(self.token_dropout, noise_shape=(None, None, 1))
        self._table = sinusoidal_encoding(self.max_len, self.d_model) if position == "sinusoidal" else None

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", shape=(self.embedded_tokens, self.d_model),
            initializer=tf.keras.initializers.RandomNormal(stddev=self.d_model ** -0.5))
        if self.vector_dim:
            self.word_vectors = self.add_weight("word_vectors", shape=(self.vocab_size, self.vector_dim),
                                                initializer="zeros", trainable=False)
            # Unit-variance vectors come out with the spread of the embeddings' initial rows.
            self.vector_kernel = self.add_weight(
                "vector_kernel", shape=(self.vector_dim, self.d_model),
                initializer=tf.keras.initializers.RandomNormal(stddev=(self.vector_dim * self.d_model) ** -0.5))
        if self.position == "learned":
            self.position_embeddings = self.add_weight(
                "position_embeddings", shape=(self.max_len, self.d_model),
                initializer=tf.keras.initializers.RandomNormal(stddev=0.02))
        if self.norm_epsilon:
            self.ln_gamma = self.add_weight("ln_gamma", shape=(self.d_model,), initializer="ones")
            self.ln_beta = self.add_weight("ln_beta", shape=(self.d_model,), initializer="zeros")
        super().build(input_shape)

    def get_prunable_weights(self):
        return [self.embeddings]

    def _quantizable_weights(self):
        return ["embeddings", "word_vectors", "vector_kernel"] if self.vector_dim else ["embeddings"]

    def call(self, inputs, training=None):
        return self.from_token_vectors(self.token_vectors(inputs), training=training)

    def token_vectors(self, ids):
        """ids [B, T] -> each token's row [B, T, d_model]: its embedding (plus its projected word vector)."""
        ids = tf.cast(ids, tf.int32)
        if self.embedded_tokens < self.vocab_size:  # a zero row past the embedded tokens
            inside = ids < self.embedded_tokens
            rows = tf.gather(self._weight("embeddings"), tf.where(inside, ids, tf.zeros_like(ids)))
            rows *= tf.cast(inside, rows.dtype)[..., None]
        else:
            rows = tf.gather(self._weight("embeddings"), ids)
        if self.vector_dim:  # one FULLY_CONNECTED over every token in TFLite
            vecs = tf.reshape(tf.gather(self._weight("word_vectors"), ids), [-1, self.vector_dim])
            rows += tf.reshape(tf.matmul(vecs, self._weight("vector_kernel")), tf.shape(rows))
        return rows

    def from_token_vectors(self, vectors, training=None):
        """Token rows [B, T, d_model] (as token_vectors gives them) -> the layer's output; explain
        calls it with interpolated rows for integrated gradients."""
        x = tf.cast(vectors, self.compute_dtype)
        if self.scale:
            x = x * tf.cast(math.sqrt(self.d_model), self.compute_dtype)
        x = self._token_dropout(x, training=training)
        length = tf.shape(vectors)[1]
        if self.position == "learned":
            pos = self.position_embeddings[:length]
        else:
            pos = tf.constant(self._table)[:length]
        x = x + tf.cast(pos, self.compute_dtype)  # [T, d] broadcasts over the batch
        if self.norm_epsilon:
            x = _layer_norm(x, self._weight("ln_gamma"), self._weight("ln_beta"), self.norm_epsilon)
        return self._dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape).concatenate([self.d_model])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "d_model": self.d_model,
                "max_len": self.max_len, "position": self.position, "dropout": self.dropout,
                "token_dropout": self.token_dropout, "vector_dim": self.vector_dim,
                "embedded_tokens": self.embedded_tokens, "scale": self.scale, "norm_epsilon": self.norm_epsilon}


@_register
class EncoderBlock(_Layer):
    """Pre-LN Transformer encoder block: x + Conv(LN(x)) when conv_width > 0, then x + MHA(LN(x)),
    then x + FFN(LN(x)); norm="post": BERT's block, LN(x + MHA(x)) then LN(x + FFN(x)), no convolution.
    score_limit: attention scores are clipped to [-score_limit, score_limit], padded keys get -3 * score_limit.

    inputs: [x [B, T, d_model], mask [B, T] (1 = token, 0 = padding)] -> [B, T, d_model].
    conv_width: tokens seen by a convolution (d_model -> d_model, then the activation) centred on
    each token, ahead of attention; 0 for the plain block of "Attention Is All You Need".
    """

    def __init__(self, d_model, num_heads, ff_dim, dropout=0.0, activation="gelu", epsilon=1e-6, conv_width=0,
                 norm="pre", score_limit=_SCORE_LIMIT, **kwargs):
        super().__init__(**kwargs)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        if conv_width < 0 or conv_width % 2 == 0 and conv_width:
            raise ValueError(f"conv_width must be 0 or odd (a window centred on each token), got {conv_width}")
        if norm not in ("pre", "post") or norm == "post" and conv_width:
            raise ValueError(f"norm must be 'pre' or 'post' (post: without convolution), got {norm!r}")
        self.d_model = int(d_model)
        self.num_heads = int(num_heads)
        self.ff_dim = int(ff_dim)
        self.dropout = float(dropout)
        self.activation = activation
        self.epsilon = float(epsilon)
        self.conv_width = int(conv_width)
        self.norm = norm
        self.score_limit = float(score_limit)
        self._head_dim = self.d_model // self.num_heads
        if self.conv_width:  # a Dropout never called has no random generator for train's checkpoints
            self._conv_dropout = tf.keras.layers.Dropout(self.dropout)
        self._attn_dropout = tf.keras.layers.Dropout(self.dropout)
        self._out_dropout = tf.keras.layers.Dropout(self.dropout)
        self._ffn_dropout = tf.keras.layers.Dropout(self.dropout)

    def build(self, input_shape):
        d, f = self.d_model, self.ff_dim
        glorot, zeros, ones = "glorot_uniform", "zeros", "ones"
        if self.conv_width:
            self.ln0_gamma = self.add_weight("ln0_gamma", shape=(d,), initializer=ones)
            self.ln0_beta = self.add_weight("ln0_beta", shape=(d,), initializer=zeros)
            self.conv_kernel = self.add_weight("conv_kernel", shape=(self.conv_width * d, d), initializer=glorot)
            self.conv_bias = self.add_weight("conv_bias", shape=(d,), initializer=zeros)
        self.ln1_gamma = self.add_weight("ln1_gamma", shape=(d,), initializer=ones)
        self.ln1_beta = self.add_weight("ln1_beta", shape=(d,), initializer=zeros)
        self.q_kernel = self.add_weight("q_kernel", shape=(d, d), initializer=glorot)
        self.q_bias = self.add_weight("q_bias", shape=(d,), initializer=zeros)
        self.k_kernel = self.add_weight("k_kernel", shape=(d, d), initializer=glorot)
        self.k_bias = self.add_weight("k_bias", shape=(d,), initializer=zeros)
        self.v_kernel = self.add_weight("v_kernel", shape=(d, d), initializer=glorot)
        self.v_bias = self.add_weight("v_bias", shape=(d,), initializer=zeros)
        self.o_kernel = self.add_weight("o_kernel", shape=(d, d), initializer=glorot)
        self.o_bias = self.add_weight("o_bias", shape=(d,), initializer=zeros)
        self.ln2_gamma = self.add_weight("ln2_gamma", shape=(d,), initializer=ones)
        self.ln2_beta = self.add_weight("ln2_beta", shape=(d,), initializer=zeros)
        self.ff1_kernel = self.add_weight("ff1_kernel", shape=(d, f), initializer=glorot)
        self.ff1_bias = self.add_weight("ff1_bias", shape=(f,), initializer=zeros)
        self.ff2_kernel = self.add_weight("ff2_kernel", shape=(f, d), initializer=glorot)
        self.ff2_bias = self.add_weight("ff2_bias", shape=(d,), initializer=zeros)
        super().build(input_shape)

    def _kernels(self):
        names = ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "ff1_kernel", "ff2_kernel")
        return ("conv_kernel",) + names if self.conv_width else names

    def get_prunable_weights(self):
        return [getattr(self, name) for name in self._kernels()]

    def _quantizable_weights(self):
        return list(self._kernels())

    def _quant_points(self):
        # Inputs of every matmul are quantization points (int8 FULLY_CONNECTED / BATCH_MATMUL need
        # input ranges). "scores" is the masked softmax input, in [-24, 8].
        act = tf.keras.activations.get(self.activation)
        conv = {"conv_input": _linear, "conv_hidden": act} if self.conv_width else {}
        return {**conv, "attn_input": _linear, "query": _linear, "key": _linear, "value": _linear,
                "scores": _linear, "probs": _linear, "context": _linear,
                "ffn_input": _linear, "ffn_hidden": act}

    def _dense(self, x2d, name):
        """[N, d_in] @ [d_in, d_out] + b: a plain 2-D matmul, FULLY_CONNECTED in TFLite."""
        return tf.matmul(x2d, self._weight(f"{name}_kernel")) + self._weight(f"{name}_bias")

    def call(self, inputs, training=None, return_attention=False):
        """return_attention=True (used only by explain, never in the exported graph): also the attention
        weights [B, H, T, T] (query rows, key columns; each row sums to 1, padded keys get < 1e-6)."""
        x, mask = inputs
        x = tf.cast(x, self.compute_dtype)
        shape = tf.shape(x)
        batch, length = shape[0], shape[1]
        h, d = self.num_heads, self._head_dim

        if self.conv_width:
            # Convolution on LN(x) as one matmul: each token's window of conv_width neighbours is
            # concatenated ([B*T, w*d] @ [w*d, d], FULLY_CONNECTED in TFLite). Padded positions are
            # zeroed first, so a token next to padding sees what it sees at the end of any sequence.
            keep = tf.reshape(tf.cast(mask, self.compute_dtype), [batch, length, 1])
            y = _layer_norm(x, self._weight("ln0_gamma"), self._weight("ln0_beta"), self.epsilon) * keep
            r = self.conv_width // 2
            y = tf.pad(y, [[0, 0], [r, r], [0, 0]])
            window = tf.concat([y[:, i:i + length] for i in range(self.conv_width)], axis=-1)
            window = self._point("conv_input", tf.reshape(window, [-1, self.conv_width * self.d_model]))
            y = self._point("conv_hidden", self._dense(window, "conv"))
            x = x + self._conv_dropout(tf.reshape(y, shape), training=training)

        # Self-attention on LN(x) (pre) or on x (post).
        pre = self.norm == "pre"
        y = _layer_norm(x, self._weight("ln1_gamma"), self._weight("ln1_beta"), self.epsilon) if pre else x
        y = tf.reshape(self._point("attn_input", y), [-1, self.d_model])

        def heads(t):  # [B*T, d] -> [B, H, T, d_head]
            return tf.transpose(tf.reshape(t, [batch, length, h, d]), [0, 2, 1, 3])

        q = heads(self._point("query", self._dense(y, "q") * tf.cast(d ** -0.5, self.compute_dtype)))
        k = heads(self._point("key", self._dense(y, "k")))
        v = heads(self._point("value", self._dense(y, "v")))
        limit = self.score_limit
        scores = tf.clip_by_value(tf.matmul(q, k, transpose_b=True), -limit, limit)  # [B, H, T, T]
        # keys mask [B, 1, 1, T]. reshape, not [:, None]: a new-axis strided slice on a dynamic shape
        # needs Flex ops in TFLite.
        keys = tf.reshape(tf.cast(mask, self.compute_dtype), [batch, 1, 1, length])
        pad = _PAD_LOGIT / _SCORE_LIMIT * limit
        scores = self._point("scores", scores * keys + (1.0 - keys) * tf.cast(pad, self.compute_dtype))
        probs = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
        attention = probs = self._point("probs", tf.cast(probs, self.compute_dtype))
        probs = self._attn_dropout(probs, training=training)
        ctx = tf.reshape(tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3]), [-1, self.d_model])
        out = self._dense(self._point("context", ctx), "o")
        x = x + self._out_dropout(tf.reshape(out, shape), training=training)
        if not pre:
            x = _layer_norm(x, self._weight("ln1_gamma"), self._weight("ln1_beta"), self.epsilon)

        # Feed-forward on LN(x) (pre) or on x (post).
        y = _layer_norm(x, self._weight("ln2_gamma"), self._weight("ln2_beta"), self.epsilon) if pre else x
        y = tf.reshape(self._point("ffn_input", y), [-1, self.d_model])
        y = self._point("ffn_hidden", self._dense(y, "ff1"))
        y = self._dense(y, "ff2")
        out = x + self._ffn_dropout(tf.reshape(y, shape), training=training)
        if not pre:
            out = _layer_norm(out, self._weight("ln2_gamma"), self._weight("ln2_beta"), self.epsilon)
        return (out, attention) if return_attention else out

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "dropout": self.dropout, "activation": self.activation,
                "epsilon": self.epsilon, "conv_width": self.conv_width, "norm": self.norm,
                "score_limit": self.score_limit}


@_register
class LayerNorm(_Layer):
    """LayerNorm over the last axis with its own gamma/beta, computed in float32 (the final Pre-LN norm)."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        dim = tf.TensorShape(input_shape)[-1]
        self.gamma = self.add_weight("gamma", shape=(dim,), initializer="ones")
        self.beta = self.add_weight("beta", shape=(dim,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        x = tf.cast(inputs, self.compute_dtype)
        return _layer_norm(x, self._weight("gamma"), self._weight("beta"), self.epsilon)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@_register
class SequencePooling(_Layer):
    """[x [B, T, d], mask [B, T]] -> [B, d]: mean over positions with mask 1 ("mean"; 0 vector for an
    all-padding row) or the vector at position 0 ("cls")."""

    def __init__(self, mode="mean", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("mean", "cls"):
            raise ValueError(f"mode must be 'mean' or 'cls', got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x, mask = inputs
        if self.mode == "cls":
            return tf.cast(x[:, 0, :], self.compute_dtype)
        x = tf.cast(x, tf.float32)
        m = tf.expand_dims(tf.cast(mask, tf.float32), -1)
        total = tf.reduce_sum(x * m, axis=1)
        count = tf.maximum(tf.reduce_sum(m, axis=1), 1.0)
        return tf.cast(total / count, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape[0])
        return tf.TensorShape([shape[0], shape[-1]])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _count_in_text(rows, valid):
    """[B, L] int32 rows, [B, L] int32 0/1 -> [B, L] float32: how many valid positions of the same text hold each
    position's row. UNIQUE over (text, row) keys, then a segment sum: linear in L, where comparing every pair
    of positions took L^2 memory (4 MB a text per order at 1,024 wordpieces) and 3 ms per order in LiteRT."""
    batch = tf.shape(rows, out_type=tf.int64)[0]
    keys = tf.cast(rows, tf.int64) + tf.expand_dims(tf.range(batch) * (1 << 32), 1)  # rows < 2^31
    _, index = tf.unique(tf.reshape(keys, [-1]))
    counts = tf.math.unsorted_segment_sum(tf.reshape(valid, [-1]), index, tf.size(index))
    return tf.cast(tf.reshape(tf.gather(counts, index), tf.shape(rows)), tf.float32)


@_register
class NgramLogits(_Layer):
    """[ids [B, T] int32, mask [B, T]] -> logits [B, num_classes] of a logistic regression on the TF-IDF
    features of the text's hashed wordpiece n-grams (pipeline/ngram.py has the arithmetic and the fit).

    Builtin TFLite ops only (MUL/FLOOR_MOD on int32, UNIQUE, UNSORTED_SEGMENT_SUM, GATHER, LOG, RSQRT). The
    weights are fitted in closed form after the Transformer is trained, so they are not trainable; zeros (the
    initial value) make the term a no-op.
    """

    def __init__(self, vocab_size, num_classes, order=3, buckets=131072, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        ngram.check_sizes(vocab_size, order, buckets)
        self.vocab_size = int(vocab_size)
        self.num_classes = int(num_classes)
        self.order = int(order)
        self.buckets = int(buckets)

    def build(self, input_shape):
        rows = ngram.num_rows(self.vocab_size, self.order, self.buckets)
        self.table = self.add_weight("table", shape=(rows, self.num_classes), initializer="zeros", trainable=False)
        self.idf = self.add_weight("idf", shape=(rows,), initializer="zeros", trainable=False)
        self.bias = self.add_weight("bias", shape=(self.num_classes,), initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs):
        ids, mask = inputs
        ids = tf.cast(ids, tf.int32)
        # 0/1 in int32: the counts (UNIQUE, segment sum) run on LiteRT's builtin kernels, and an input computed
        # by XNNPACK in float would split the graph into two delegate partitions around them
        real = tf.cast(tf.not_equal(mask, 0), tf.int32)
        rows, valid_int, h = ids, real, ids
        per_order = []  # (rows, share, sublinear tf) of each order's positions
        for n in range(1, self.order + 1):
            if n > 1:
                h = tf.math.floormod(h[:, :-1] * ngram.PRIME + ids[:, n - 1:], self.buckets)
                rows = h + (self.vocab_size + (n - 2) * self.buckets)
                valid_int = valid_int[:, :-1] * real[:, n - 1:]
            valid = tf.cast(valid_int, tf.float32)
            count = tf.maximum(_count_in_text(rows, valid_int), 1.0)
            sublinear = 1.0 + tf.math.log(count)
            # each of a feature's `count` positions carries 1/count of its sublinear tf, 1 + ln(count)
            per_order.append((rows, valid * sublinear / count, sublinear))
        # One GATHER per table for all orders: the int8 converter gives every GATHER its own quantized
        # copy of the table it reads.
        all_rows = tf.concat([r for r, _, _ in per_order], axis=1)
        weights, idf = tf.gather(self.table, all_rows), tf.gather(self.idf, all_rows)
        logits, start = self.bias, 0
        for rows, share, sublinear in per_order:
            end = start + tf.shape(rows)[1]
            total = tf.reduce_sum(tf.expand_dims(share, -1) * weights[:, start:end], axis=1)
            norm2 = tf.reduce_sum(share * sublinear * tf.square(idf[:, start:end]), axis=1)
            # Each order's features are L2-normalised on their own (pipeline/ngram.py, tfidf). A text with
            # any seen n-gram has norm2 >= 1 (idf >= 1, 1 + ln count >= 1), one with none has total 0, so
            # the floor of 1 changes nothing. A product with RSQRT, not a DIV by SQRT: in int8, a small
            # norm2 rounds to zero and DIV refuses a zero divisor, while RSQRT saturates at its range's top.
            logits = logits + total * tf.expand_dims(tf.math.rsqrt(tf.maximum(norm2, 1.0)), -1)
            start = end
        return logits

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([tf.TensorShape(input_shape[0])[0], self.num_classes])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "num_classes": self.num_classes,
                "order": self.order, "buckets": self.buckets}


@_register
class ClassifierHead(_Layer):
    """[B, d], or [[B, d], extra logits [B, num_classes]] -> class probabilities [B, num_classes]: dense,
    plus the extra logits (the n-gram term), then softmax, in float32 whatever the mixed-precision policy.
    Not pruned (a few hundred weights that every prediction goes through)."""

    def __init__(self, num_classes, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)

    @staticmethod
    def _features_shape(input_shape):
        """The shape of x, whether the input is x or [x, extra logits]."""
        if isinstance(input_shape, (list, tuple)) and not isinstance(input_shape[0], (int, type(None))):
            return tf.TensorShape(input_shape[0])
        return tf.TensorShape(input_shape)

    def build(self, input_shape):
        dim = self._features_shape(input_shape)[-1]
        self.kernel = self.add_weight("kernel", shape=(dim, self.num_classes), initializer="glorot_uniform")
        self.bias = self.add_weight("bias", shape=(self.num_classes,), initializer="zeros")
        super().build(input_shape)

    def _quantizable_weights(self):
        return ["kernel"]

    def _quant_points(self):
        return {"logits": _linear}

    def call(self, inputs, logits=False):
        """logits=True: the logits before softmax (distillation trains on them at a temperature)."""
        x, extra = inputs if isinstance(inputs, (list, tuple)) else (inputs, None)
        z = tf.matmul(tf.cast(x, tf.float32), self._weight("kernel")) + self._weight("bias")
        if extra is not None:
            z += tf.cast(extra, tf.float32)
        return z if logits else tf.nn.softmax(self._point("logits", z), axis=-1)

    def compute_output_shape(self, input_shape):
        return self._features_shape(input_shape)[:-1].concatenate([self.num_classes])

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def encoder_length(cfg: ModelConfig, seq_len: int, backbone=None) -> int:
    """Wordpieces of a text the encoder reads (its first ones): seq_len, at most model.max_encoder_len and the
    backbone's positions. The n-gram term reads all seq_len: attention's cost grows with the square of it."""
    return max(1, min(seq_len, cfg.max_encoder_len or seq_len, backbone.max_positions if backbone else seq_len))


def _encode(cfg: ModelConfig, vocab_size: int, max_len: int, inputs, vector_dim=0, embedded_tokens=0, backbone=None):
    """The encoder (the layers `make pretrain` trains and `make train` starts from), applied to symbolic
    inputs of up to max_len positions: (clipped ids, float mask, final-norm output [B, T, d_model]), cut to the
    first encoder_length positions. backbone: a BackboneSpec (pipeline/backbone.py): BERT's encoder of that
    shape instead of model.*'s."""
    length = encoder_length(cfg, max_len, backbone)
    keep = length if length < max_len else 0
    if backbone is not None:
        return _encode_bert(backbone, vocab_size, length, inputs, keep)
    if cfg.d_model % cfg.num_heads:
        raise PipelineError(f"model.d_model ({cfg.d_model}) must be divisible by model.num_heads ({cfg.num_heads})")
    if cfg.position not in ("sinusoidal", "learned"):
        raise PipelineError(f"model.position must be sinusoidal or learned, got {cfg.position!r}")
    if cfg.conv_width < 0 or cfg.conv_width % 2 == 0 and cfg.conv_width:
        raise PipelineError(f"model.conv_width must be 0 or odd, got {cfg.conv_width}")
    if vocab_size < 1 or max_len < 1:
        raise PipelineError(f"vocab_size and max_len must be positive, got {vocab_size} and {max_len}")
    ids = ClipTokenIds(vocab_size, keep, name="token_ids")(inputs["input_word_ids"])
    mask = PaddingMask(keep, name="padding_mask")(inputs["input_mask"])
    x = TokenAndPositionEmbedding(vocab_size, cfg.d_model, length, position=cfg.position,
                                  dropout=cfg.dropout, token_dropout=cfg.token_dropout, vector_dim=vector_dim,
                                  embedded_tokens=embedded_tokens, name="embedding")(ids)
    for i in range(cfg.num_layers):
        x = EncoderBlock(cfg.d_model, cfg.num_heads, cfg.ff_dim, dropout=cfg.dropout, activation="gelu",
                         conv_width=cfg.conv_width, name=f"encoder_{i}")([x, mask])
    return ids, mask, LayerNorm(name="final_norm")(x)


def _encode_bert(spec, vocab_size: int, max_len: int, inputs, keep=0):
    """BERT's encoder from our layers: LN(word + position + type-0 embedding), then post-LN blocks (no final norm)."""
    if vocab_size != spec.vocab_size:
        raise PipelineError(f"the backbone has {spec.vocab_size} tokens, the run {vocab_size}: its data stage "
                            "used another vocabulary")
    ids = ClipTokenIds(vocab_size, keep, name="token_ids")(inputs["input_word_ids"])
    mask = PaddingMask(keep, name="padding_mask")(inputs["input_mask"])
    x = TokenAndPositionEmbedding(vocab_size, spec.d_model, max_len, position="learned", dropout=spec.dropout,
                                  scale=False, norm_epsilon=spec.epsilon, name="embedding")(ids)
    for i in range(spec.num_layers):
        x = EncoderBlock(spec.d_model, spec.num_heads, spec.ff_dim, dropout=spec.dropout, epsilon=spec.epsilon,
                         norm="post", score_limit=BERT_SCORE_LIMIT, name=f"encoder_{i}")([x, mask])
    return ids, mask, x


def set_word_vectors(model: tf.keras.Model, table, seen, learned):
    """Give a model's embedding layer the run's word vectors (vectors.load_table), and zero the embeddings of
    tokens no training text has (`seen` False): they would stay random noise; the vector alone speaks for them."""
    layer = model.get_layer("embedding")
    layer.word_vectors.assign(table)
    keep = tf.constant(seen[:learned])[:, None]
    layer.embeddings.assign(tf.where(keep, layer.embeddings, tf.zeros_like(layer.embeddings)))


def find_layer(model: tf.keras.Model, name: str):
    """The model's layer called `name`, or None (get_layer raises instead)."""
    return next((layer for layer in model.layers if layer.name == name), None)


def encoder_layer_names(model: tf.keras.Model) -> list[str]:
    """Names of the layers with encoder weights (embedding, blocks, final norm), in model order."""
    return [l.name for l in model.layers
            if l.name == "embedding" or l.name.startswith("encoder_") or l.name == "final_norm"]


def copy_encoder_weights(source: tf.keras.Model, target: tf.keras.Model):
    """Set every encoder layer of `target` to the weights of `source`'s layer of the same name; a
    PipelineError when the two encoders differ in layers or shapes (a different model config)."""
    names = encoder_layer_names(target)
    if names != encoder_layer_names(source):
        raise PipelineError(f"the pretrained encoder has layers {encoder_layer_names(source)}, the model "
                            f"{names}: model.num_layers differs; run `make pretrain` again")
    for name in names:
        src, dst = source.get_layer(name).get_weights(), target.get_layer(name).get_weights()
        if [w.shape for w in src] != [w.shape for w in dst]:
            raise PipelineError(f"the pretrained encoder's layer {name} has weight shapes "
                                f"{[w.shape for w in src]}, the model {[w.shape for w in dst]}: a different "
                                "model config or vocabulary; run `make pretrain` again")
        target.get_layer(name).set_weights(src)


@_register
class MaskedLMHead(_Layer):
    """[x [B, T, d], positions [B, P] int32] -> logits over the vocabulary [B, P, vocab_size] at the given
    positions: dense + GELU + LayerNorm, then a vocabulary projection (BERT's MLM head, untied: it is
    dropped after pretraining, so tying would save nothing on the phone)."""

    def __init__(self, vocab_size, epsilon=1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        d = tf.TensorShape(input_shape[0])[-1]
        self.transform_kernel = self.add_weight("transform_kernel", shape=(d, d), initializer="glorot_uniform")
        self.transform_bias = self.add_weight("transform_bias", shape=(d,), initializer="zeros")
        self.gamma = self.add_weight("gamma", shape=(d,), initializer="ones")
        self.beta = self.add_weight("beta", shape=(d,), initializer="zeros")
        self.output_kernel = self.add_weight("output_kernel", shape=(d, self.vocab_size), initializer="glorot_uniform")
        self.output_bias = self.add_weight("output_bias", shape=(self.vocab_size,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        x, positions = inputs
        h = tf.gather(tf.cast(x, tf.float32), tf.cast(positions, tf.int32), batch_dims=1)  # [B, P, d]
        h = tf.nn.gelu(tf.matmul(h, self.transform_kernel) + self.transform_bias)
        h = _layer_norm(h, self.gamma, self.beta, self.epsilon)
        return tf.matmul(h, self.output_kernel) + self.output_bias

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[1]).concatenate([self.vocab_size])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "epsilon": self.epsilon}


def build_mlm_model(cfg: ModelConfig, vocab_size: int, max_len: int, vector_dim=0, embedded_tokens=0) -> tf.keras.Model:
    """The encoder with a masked-language-model head: {input_word_ids, input_mask [B, T], mask_positions
    [B, P]} int32 -> logits [B, P, vocab_size] float32."""
    names = ("input_word_ids", "input_mask", "mask_positions")
    inputs = {name: tf.keras.Input(shape=(None,), dtype="int32", name=name) for name in names}
    _, _, x = _encode(cfg, vocab_size, max_len, inputs, vector_dim, embedded_tokens)
    logits = MaskedLMHead(vocab_size, name="mlm_head")([x, inputs["mask_positions"]])
    return tf.keras.Model(inputs=inputs, outputs=logits, name="liteformer_mlm")


def build_model(cfg: ModelConfig, vocab_size: int, num_classes: int, max_len: int, vector_dim=0,
                embedded_tokens=0, backbone=None) -> tf.keras.Model:
    """The functional classifier: dict of int32 inputs [B, T] (T <= max_len, any T) -> probabilities
    [B, num_classes] float32. Layers are created under the current global mixed-precision policy.
    vector_dim, embedded_tokens: the run's word vectors' width and its learned vocabulary's size
    (vectors.model_sizes; 0: none); set_word_vectors fills them. backbone: see _encode."""
    if cfg.pooling not in ("mean", "cls"):
        raise PipelineError(f"model.pooling must be mean or cls, got {cfg.pooling!r}")
    if num_classes < 2:
        raise PipelineError(f"need at least 2 classes, got {num_classes}")
    try:
        ngram.check_sizes(vocab_size, cfg.ngram_order, cfg.ngram_buckets)
    except ValueError as e:  # a config error: one line naming the keys, not a traceback
        raise PipelineError(f"model.ngram_order / model.ngram_buckets: {e}") from None

    inputs = {name: tf.keras.Input(shape=(None,), dtype="int32", name=name) for name in INPUT_NAMES}
    ids, mask, x = _encode(cfg, vocab_size, max_len, inputs, vector_dim, embedded_tokens, backbone)
    x = SequencePooling(cfg.pooling, name="pooling")([x, mask])
    if cfg.ngram_order:
        if encoder_length(cfg, max_len, backbone) < max_len:  # the n-gram term reads the whole text
            ids = ClipTokenIds(vocab_size, name="ngram_token_ids")(inputs["input_word_ids"])
            mask = PaddingMask(name="ngram_padding_mask")(inputs["input_mask"])
        x = [x, NgramLogits(vocab_size, num_classes, cfg.ngram_order, cfg.ngram_buckets, name="ngrams")([ids, mask])]
    probs = ClassifierHead(num_classes, name="probabilities")(x)
    return tf.keras.Model(inputs=inputs, outputs=probs, name="liteformer")


def logits_model(model: tf.keras.Model) -> tf.keras.Model:
    """A model sharing `model`'s layers and weights whose output is the head's logits, not probabilities."""
    head = model.get_layer("probabilities")
    return tf.keras.Model(model.inputs, head(head.input, logits=True), name=f"{model.name}_logits")


# --------------------------------------------------------------------------------------------------
# Quantization-aware training


@_register
class PointQuantizer(_quant.MovingAverageQuantizer):
    """MovingAverageQuantizer whose min/max variables carry the point's name (unique within a layer;
    QuantizeAwareActivation would name all of them 'post_activation_min/max')."""

    def __init__(self, point, num_bits=8, per_axis=False, symmetric=False, narrow_range=False):
        super().__init__(num_bits=num_bits, per_axis=per_axis, symmetric=symmetric, narrow_range=narrow_range)
        self.point = point

    def build(self, tensor_shape, name, layer):
        return super().build(tensor_shape, f"{self.point}_{name}", layer)

    def get_config(self):
        return {**super().get_config(), "point": self.point}


@_register
class LiteformerQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """QuantizeConfig for our layers: kernels (and the embedding matrix) fake-quantized with
    LastValueQuantizer (8 bits, per-tensor, symmetric, narrow range), every quantization point of the
    layer with MovingAverageQuantizer (attention probabilities: FixedQuantizer [0, 1]), and the layer
    output with MovingAverageQuantizer (unless quantize_output=False).

    Per-tensor only: per-axis kernels train, but TF 2.21's TFLite converter rejects them for these
    matmuls ("'tfl.transpose' op has mismatched quantized axes of input and output"); TFMOT's own
    Dense config is per-tensor for the same reason."""

    def __init__(self, num_bits=8, quantize_output=True, preserve_sparsity=False, float_points=(),
                 preserve_clusters=False):
        self.num_bits = int(num_bits)
        self.preserve_clusters = bool(preserve_clusters)  # TFMOT's cluster-preserving quantizer (CQAT)
        self.quantize_output = bool(quantize_output)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.float_points = tuple(float_points)  # points left without fake-quant: float islands in the export

    def _points(self, layer):
        return {k: v for k, v in layer._quant_points().items() if k not in self.float_points}

    def get_weights_and_quantizers(self, layer):
        # TFMOT's prune-preserving quantizer (of Default8BitPrunePreserveQuantizeScheme) multiplies the
        # kernel by its zero mask, taken when the QAT model is built, before fake-quantizing it.
        # TFMOT's cluster-preserving one trains the centroids of a clustered kernel, not its elements.
        args = dict(num_bits=self.num_bits, per_axis=False, symmetric=True, narrow_range=True)
        if self.preserve_clusters:
            clustered = {w.ref() for _, w in layer.get_clusterable_weights()}
            return [(getattr(layer, name), _ClusterPreserveQuantizer(**args, preserve_sparsity=self.preserve_sparsity)
                     if getattr(layer, name).ref() in clustered else _quant.LastValueQuantizer(**args))
                    for name in layer._quantizable_weights()]
        quantizer = _PrunePreserveQuantizer if self.preserve_sparsity else _quant.LastValueQuantizer
        return [(getattr(layer, name), quantizer(**args)) for name in layer._quantizable_weights()]

    def set_quantize_weights(self, layer, quantize_weights):
        layer._set_weight_overrides(zip(layer._quantizable_weights(), quantize_weights))

    def get_activations_and_quantizers(self, layer):
        out = []
        for name, fn in self._points(layer).items():
            if name == "probs":
                quantizer = _quant.FixedQuantizer(num_bits=self.num_bits, init_min=0.0, init_max=1.0,
                                                  narrow_range=False)
            else:
                quantizer = PointQuantizer(name, num_bits=self.num_bits)
            out.append((fn, quantizer))
        return out

    def set_quantize_activations(self, layer, quantize_activations):
        layer._set_point_overrides(zip(self._points(layer), quantize_activations))

    def get_output_quantizers(self, layer):
        if not self.quantize_output:
            return []
        return [_quant.MovingAverageQuantizer(num_bits=self.num_bits, per_axis=False, symmetric=False,
                                              narrow_range=False)]

    def get_config(self):
        return {"num_bits": self.num_bits, "quantize_output": self.quantize_output,
                "preserve_sparsity": self.preserve_sparsity, "float_points": list(self.float_points),
                "preserve_clusters": self.preserve_clusters}


_QAT_LAYERS = (TokenAndPositionEmbedding, EncoderBlock, LayerNorm, SequencePooling, ClassifierHead)
_NO_QAT_LAYERS = (ClipTokenIds, PaddingMask, NgramLogits)  # int32 consumers: must stay unannotated


def custom_objects():
    """Every class this module registers, by plain and registered name."""
    classes = (ClipTokenIds, PaddingMask, TokenAndPositionEmbedding, EncoderBlock, LayerNorm,
               SequencePooling, NgramLogits, ClassifierHead, MaskedLMHead, PointQuantizer, LiteformerQuantizeConfig)
    objects = {cls.__name__: cls for cls in classes}
    objects[_PrunePreserveQuantizer.__name__] = _PrunePreserveQuantizer
    objects[_ClusterPreserveQuantizer.__name__] = _ClusterPreserveQuantizer
    objects.update({f"{PACKAGE}>{cls.__name__}": cls for cls in classes})
    return objects


def qat_scope():
    """tfmot quantize_scope with our layers and configs (for quantize_apply and loading QAT models)."""
    return tfmot.quantization.keras.quantize_scope(custom_objects())


def annotate_for_qat(model: tf.keras.Model, num_bits: int = 8, preserve_sparsity: bool = False,
                     float_points=(), preserve_clusters: bool = False) -> tf.keras.Model:
    """A clone of `model` (sharing its layers) with every layer annotated for QAT: our layers with
    LiteformerQuantizeConfig, any built-in layer with TFMOT's default registry. ClipTokenIds and
    PaddingMask are left alone (their inputs are int32, see the module docstring).

    Then: `with qat_scope(): qat = tfmot.quantization.keras.quantize_apply(annotated)` (float32 only:
    FakeQuant ops have no bfloat16/float16 kernels)."""
    annotate = tfmot.quantization.keras.quantize_annotate_layer

    def _annotate(layer):
        if isinstance(layer, _NO_QAT_LAYERS):
            return layer
        if isinstance(layer, _QAT_LAYERS):
            # The head's output is the float probabilities: its logits are quantized, not its output
            # (as TFMOT does for softmax).
            return annotate(layer, LiteformerQuantizeConfig(
                num_bits=num_bits, quantize_output=not isinstance(layer, ClassifierHead),
                preserve_sparsity=preserve_sparsity, float_points=float_points,
                preserve_clusters=preserve_clusters))
        return annotate(layer)  # any built-in layer: TFMOT's default registry

    with qat_scope():
        return tf.keras.models.clone_model(model, clone_function=_annotate)


class _PrunePreserveScheme(tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme):
    """TFMOT's prune-preserving scheme, except that its registry claims every weightless layer and then
    fails on ours (ClipTokenIds, PaddingMask: "get_quantize_config() called on an unsupported layer")."""

    def get_quantize_registry(self):
        registry = super().get_quantize_registry()
        supports = registry.supports
        registry.supports = lambda layer: not isinstance(layer, _NO_QAT_LAYERS) and supports(layer)
        return registry


def quantize_model(model: tf.keras.Model, num_bits: int = 8, preserve_sparsity: bool = False,
                   float_points=(), preserve_clusters: bool = False) -> tf.keras.Model:
    """annotate_for_qat + quantize_apply: a QAT model initialised with `model`'s weights (a copy: the
    float model is not changed by training the QAT model). preserve_sparsity: TFMOT's collaborative
    prune-preserving scheme, so the zeros of a pruned model stay zero in the quantized kernels."""
    annotated = annotate_for_qat(model, num_bits=num_bits, preserve_sparsity=preserve_sparsity,
                                 float_points=float_points, preserve_clusters=preserve_clusters)
    scheme = (_PrunePreserveScheme() if preserve_sparsity
              else tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme())
    with qat_scope():
        return tfmot.quantization.keras.quantize_apply(annotated, scheme)


# --------------------------------------------------------------------------------------------------
# Export helpers and loading


def serving_function(model: tf.keras.Model, seq_len: int, batch_size: int = 1):
    """A concrete function of `model` with fixed int32 [batch_size, seq_len] inputs named like the
    model inputs (for tf.lite.TFLiteConverter.from_concrete_functions([fn], model))."""
    specs = {name: tf.TensorSpec([batch_size, seq_len], tf.int32, name=name) for name in INPUT_NAMES}

    @tf.function
    def serve(inputs):
        return model(inputs, training=False)

    return serve.get_concrete_function(specs)


def load_model(path, compile: bool = False) -> tf.keras.Model:
    """Load a `.keras` file (safe_mode=True) or a SavedModel directory saved from a model of this
    module. QAT models and unstripped pruned models load too (TFMOT scopes are opened)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: model not found")
    if path.is_file() and path.suffix != ".keras":
        raise PipelineError(f"{path}: expected a .keras file or a SavedModel directory")
    if path.is_dir() and not (path / "saved_model.pb").exists():
        raise PipelineError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(qat_scope())
        stack.enter_context(tfmot.sparsity.keras.prune_scope())
        if path.is_file():
            return tf.keras.models.load_model(path, compile=compile, safe_mode=True)
        return tf.keras.models.load_model(path, compile=compile)
