"""The Transformer encoder classifier's small Keras layers and their TFMOT hooks (BaseLayer). EncoderBlock is in
encoder.py, the MLM head in mlm.py; build.py joins them into a model and loads one.

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
import math

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from pipeline.model import ngram

PACKAGE = "liteformer"  # registered names "liteformer>ClassName": saved models find their classes by them
register = tf.keras.utils.register_keras_serializable(package=PACKAGE)


def sinusoidal_encoding(length: int, d_model: int) -> np.ndarray:
    """Positional encoding of "Attention Is All You Need", float32 [length, d_model].

    PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).
    """
    pos = np.arange(length, dtype=np.float64)[:, None]
    dims = np.arange(d_model)
    angles = pos / np.power(10000.0, (2 * (dims // 2)) / d_model)[None, :]
    table = np.where(dims % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, computed in float32 whatever the compute dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    y = centered * tf.math.rsqrt(var + epsilon) * tf.cast(gamma, tf.float32) + tf.cast(beta, tf.float32)
    return tf.cast(y, dtype)


class BaseLayer(tf.keras.layers.Layer, tfmot.sparsity.keras.PrunableLayer, tfmot.clustering.keras.ClusterableLayer):
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
linear = tf.keras.activations.linear


@register
class ClipTokenIds(BaseLayer):
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


@register
class PaddingMask(BaseLayer):
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


@register
class TokenAndPositionEmbedding(BaseLayer):
    """ids [B, T] -> embeddings * sqrt(d_model) + position encoding [B, T, d_model], then dropout.

    position: "sinusoidal" (fixed table, not a weight) or "learned" (a [max_len, d_model] weight).
    token_dropout: in training, the fraction of whole word embeddings zeroed (word dropout), so the
    classifier cannot lean on any single word. T must be <= max_len.
    vector_dim > 0: each token's fixed pretrained vector ([vocab_size, vector_dim], not trained; see
    pipeline/text/vectors.py) times a trained projection is added to its embedding. embedded_tokens: only ids below
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
            x = layer_norm(x, self._weight("ln_gamma"), self._weight("ln_beta"), self.norm_epsilon)
        return self._dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape).concatenate([self.d_model])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "d_model": self.d_model,
                "max_len": self.max_len, "position": self.position, "dropout": self.dropout,
                "token_dropout": self.token_dropout, "vector_dim": self.vector_dim,
                "embedded_tokens": self.embedded_tokens, "scale": self.scale, "norm_epsilon": self.norm_epsilon}


@register
class LayerNorm(BaseLayer):
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
        return layer_norm(x, self._weight("gamma"), self._weight("beta"), self.epsilon)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@register
class SequencePooling(BaseLayer):
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


@register
class NgramLogits(BaseLayer):
    """[ids [B, T] int32, mask [B, T]] -> logits [B, num_classes] of a logistic regression on the TF-IDF
    features of the text's hashed wordpiece n-grams (pipeline/model/ngram.py has the arithmetic and the fit).

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
            # Each order's features are L2-normalised on their own (pipeline/model/ngram.py, tfidf). A text with
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


@register
class ClassifierHead(BaseLayer):
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
        return {"logits": linear}

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
