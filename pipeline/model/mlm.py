"""Masked-language-model pretraining (`make pretrain`): the MLM head over the encoder, its loss and metrics."""
import tensorflow as tf

from pipeline.model.layers import BaseLayer, layer_norm, register


@register
class MaskedLMHead(BaseLayer):
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
        h = layer_norm(h, self.gamma, self.beta, self.epsilon)
        return tf.matmul(h, self.output_kernel) + self.output_bias

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[1]).concatenate([self.vocab_size])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "epsilon": self.epsilon}


@register
def masked_lm_loss(y_true, logits):
    """Mean cross-entropy over the masked positions; y_true holds the original ids, -1 where nothing was masked."""
    y = tf.cast(y_true, tf.int32)
    w = tf.cast(y >= 0, tf.float32)
    ce = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(y, 0), logits, from_logits=True)
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)


@register
class MaskedAccuracy(tf.keras.metrics.Metric):
    """Fraction of masked positions whose original token is the top prediction."""

    def __init__(self, name="masked_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hits = self.add_weight("hits", initializer="zeros")
        self.count = self.add_weight("count", initializer="zeros")

    def update_state(self, y_true, logits, sample_weight=None):
        y = tf.cast(y_true, tf.int32)
        w = tf.cast(y >= 0, tf.float32)
        hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.float32)
        self.hits.assign_add(tf.reduce_sum(hit * w))
        self.count.assign_add(tf.reduce_sum(w))

    def result(self):
        return self.hits / tf.maximum(self.count, 1.0)


@register
class MaskedPerplexity(MaskedAccuracy):
    """exp(mean cross-entropy per masked token) over the epoch (not a mean of per-batch perplexities)."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, logits, sample_weight=None):
        y = tf.cast(y_true, tf.int32)
        w = tf.cast(y >= 0, tf.float32)
        ce = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(y, 0), logits, from_logits=True)
        self.hits.assign_add(tf.reduce_sum(ce * w))
        self.count.assign_add(tf.reduce_sum(w))

    def result(self):
        return tf.exp(self.hits / tf.maximum(self.count, 1.0))
