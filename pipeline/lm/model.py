"""The causal Transformer language model, built from the classifier's layers (pipeline/model/).

    input_ids -> ClipTokenIds -> TiedEmbedding -> EncoderBlock(causal) x N -> LayerNorm -> TiedEmbedding -> logits
                 FullMask ------------------------^

The same TiedEmbedding layer is called twice: on int ids it embeds them (TokenAndPositionEmbedding), on float
vectors it returns their logits against the same embedding matrix (tied input/output embeddings: one matrix in
the .tflite file, and a 65-character vocabulary is too small for a separate head to earn its weights).
"""
import contextlib
from pathlib import Path

import tensorflow as tf

from pipeline.lm.config import LMConfig
from pipeline.model.encoder import EncoderBlock
from pipeline.model.layers import BaseLayer as _Layer
from pipeline.model.layers import ClipTokenIds, LayerNorm, PaddingMask, TokenAndPositionEmbedding
from pipeline.model.quantize import custom_objects, qat_scope

PACKAGE = "liteformer_lm"
_register = tf.keras.utils.register_keras_serializable(package=PACKAGE)


@_register
class TiedEmbedding(TokenAndPositionEmbedding):
    """Called on int ids [B, T]: token + position embedding. Called on vectors [B, T, d]: logits [B, T, vocab]
    = vectors @ embeddings^T (one FULLY_CONNECTED whose weights are the embedding matrix itself)."""

    def call(self, inputs, training=None):
        if inputs.dtype.is_integer:
            return super().call(inputs, training=training)
        x = tf.cast(inputs, self.compute_dtype)
        shape = tf.shape(x)
        logits = tf.matmul(tf.reshape(x, [-1, self.d_model]), self._weight("embeddings"), transpose_b=True)
        return tf.reshape(logits, tf.concat([shape[:-1], [self.embedded_tokens]], 0))

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape)
        if shape.rank == 3:
            return shape[:-1].concatenate([self.embedded_tokens])
        return super().compute_output_shape(input_shape)


@_register
class FullMask(PaddingMask):
    """ids [B, T] -> ones [B, T]: a language model's windows have no padding (the causal mask is in the block).
    A PaddingMask subclass so that QAT annotation leaves it alone like the classifier's int32 consumers."""

    def call(self, inputs):
        return tf.ones(tf.shape(inputs), self.compute_dtype)


@_register
class HashedNgramLogits(_Layer):
    """ids [B, T] -> logits [B, T, vocab] of a log-linear n-gram model: for each context length j = 1..order-1,
    the last j tokens up to position t are hashed into buckets[j-1] rows of a [vocab] table, and the rows are
    summed (Mikolov's RNNME "direct connections"). Local spelling is what a small character Transformer learns
    slowest; a row per context holds it from the start (Kneser-Ney counts: table_from_counts) and leaves the
    Transformer the longer range. Positions before the text start read the pad id `vocab_size`; ids are clipped to it.
    Each bucket count should be a prime: the hash is a polynomial in the ids modulo it. `buckets`: one count
    per context length, or one int for all (ngram_rows sizes them from the data)."""

    def __init__(self, vocab_size, order, buckets, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        buckets = [int(buckets)] * max(int(order) - 1, 0) if isinstance(buckets, (int, float)) else list(buckets)
        if order < 2 or len(buckets) != order - 1 or min(buckets) < 1 or max(buckets) * (vocab_size + 1) >= 2 ** 31:
            raise ValueError(f"n-gram order must be >= 2 with one bucket count >= 1 per context length and "
                             f"buckets * (vocab + 1) < 2^31, got order {order}, buckets {buckets}")
        self.vocab_size, self.order, self.buckets = int(vocab_size), int(order), [int(b) for b in buckets]

    def build(self, input_shape):
        self.table = self.add_weight("table", shape=(sum(self.buckets), self.vocab_size), initializer="zeros")
        super().build(input_shape)

    def get_prunable_weights(self):
        return [self.table]

    def _quantizable_weights(self):
        return ["table"]

    def rows(self, ids):
        """[B, T, order-1] table rows: context length j's hash, offset past the rows of the shorter lengths."""
        ids = tf.clip_by_value(tf.cast(ids, tf.int32), 0, self.vocab_size)
        length = tf.shape(ids)[1]
        padded = tf.pad(ids, [[0, 0], [self.order - 2, 0]], constant_values=self.vocab_size)
        back = [padded[:, self.order - 1 - k:self.order - 1 - k + length] for k in range(1, self.order)]
        rows, offset = [], 0
        for j, buckets in enumerate(self.buckets, start=1):  # fold in the last j tokens, nearest first (Rabin-Karp)
            h = tf.zeros_like(ids)
            for prev in back[:j]:
                h = (h * (self.vocab_size + 1) + prev) % buckets
            rows.append(h + offset)
            offset += buckets
        return tf.stack(rows, axis=-1)

    def call(self, inputs):
        return tf.reduce_sum(tf.gather(self._weight("table"), self.rows(inputs)), axis=2)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape).concatenate([self.vocab_size])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "order": self.order, "buckets": self.buckets}


def build_lm(cfg: LMConfig, vocab_size: int) -> tf.keras.Model:
    """input_ids int32 [B, T] (T <= cfg.context) -> next-token logits float32 [B, T, vocab_size], under the
    current global mixed-precision policy."""
    ids_in = tf.keras.Input(shape=(None,), dtype="int32", name="input_ids")
    ids = ClipTokenIds(vocab_size, name="token_ids")(ids_in)
    mask = FullMask(name="full_mask")(ids_in)
    embed = TiedEmbedding(vocab_size, cfg.d_model, cfg.context, position=cfg.position, dropout=cfg.dropout,
                          name="embedding")
    x = embed(ids)
    for i in range(cfg.num_layers):
        x = EncoderBlock(cfg.d_model, cfg.num_heads, cfg.ff_dim, dropout=cfg.dropout, score_limit=cfg.score_limit,
                         causal=True, name=f"block_{i}")([x, mask])
    x = LayerNorm(name="final_norm")(x)
    logits = tf.keras.layers.Activation("linear", dtype="float32", name="logits")(embed(x))
    if cfg.ngram_order:
        # A table started from counts stays as counted: trained on the windows it was counted from, it learns
        # train's own n-grams (tinyshakespeare dev: 2.2423 bits/char trained, 2.2179 kept; README)
        ngram = HashedNgramLogits(vocab_size, cfg.ngram_order, cfg.ngram_rows or cfg.ngram_buckets,
                                  trainable=cfg.ngram_init != "counts", name="ngram_logits")(ids_in)
        logits = tf.keras.layers.Add(dtype="float32", name="logits_sum")([logits, ngram])
    return tf.keras.Model(ids_in, logits, name="liteformer_lm")


def lm_custom_objects():
    """The classifier's registered classes and this module's."""
    classes = (TiedEmbedding, FullMask, HashedNgramLogits)
    return {**custom_objects(), **{c.__name__: c for c in classes}, **{f"{PACKAGE}>{c.__name__}": c for c in classes}}


def load_lm(path) -> tf.keras.Model:
    """A .keras file saved from build_lm's model (safe mode; QAT models load too)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: language model not found")
    with contextlib.ExitStack() as stack:
        stack.enter_context(qat_scope())
        stack.enter_context(tf.keras.utils.custom_object_scope(lm_custom_objects()))
        return tf.keras.models.load_model(path, compile=False, safe_mode=True)


def float32_copy(model: tf.keras.Model, cfg: LMConfig, vocab_size: int) -> tf.keras.Model:
    """The same weights in a float32 model (export and scoring after mixed-precision training)."""
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        copy = build_lm(cfg, vocab_size)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(model.get_weights())
    return copy
