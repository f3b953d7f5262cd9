"""EncoderBlock: the Transformer block (an optional convolution over each token's neighbours, masked multi-head
self-attention, a GELU feed-forward network), pre-LN as trained from scratch or post-LN as BERT's."""
import tensorflow as tf

from pipeline.model.layers import BaseLayer, layer_norm, linear, register

_SCORE_LIMIT = 8.0  # attention scores are clipped to [-8, 8] ...
_PAD_LOGIT = -24.0  # ... and padded keys get -24 (see "Masking" in layers.py)
# A pretrained BERT's blocks clip far wider: all-MiniLM-L6-v2's first layer has scores up to 67 on SST-2
# sentences, and a clip at 8 moves its pooled output by up to 0.14 (at 100: < 1e-6 from the reference).
BERT_SCORE_LIMIT = 100.0


@register
class EncoderBlock(BaseLayer):
    """Pre-LN Transformer encoder block: x + Conv(LN(x)) when conv_width > 0, then x + MHA(LN(x)),
    then x + FFN(LN(x)); norm="post": BERT's block, LN(x + MHA(x)) then LN(x + FFN(x)), no convolution.
    score_limit: attention scores are clipped to [-score_limit, score_limit], padded keys get -3 * score_limit.
    causal=True: each token also treats every later key as padding (a language model; needs conv_width 0).

    inputs: [x [B, T, d_model], mask [B, T] (1 = token, 0 = padding)] -> [B, T, d_model].
    conv_width: tokens seen by a convolution (d_model -> d_model, then the activation) centred on
    each token, ahead of attention; 0 for the plain block of "Attention Is All You Need".
    """

    def __init__(self, d_model, num_heads, ff_dim, dropout=0.0, activation="gelu", epsilon=1e-6, conv_width=0,
                 norm="pre", score_limit=_SCORE_LIMIT, causal=False, **kwargs):
        super().__init__(**kwargs)
        if causal and conv_width:
            raise ValueError("causal=True needs conv_width 0: the centred convolution reads later tokens")
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
        self.causal = bool(causal)
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
        conv = {"conv_input": linear, "conv_hidden": act} if self.conv_width else {}
        return {**conv, "attn_input": linear, "query": linear, "key": linear, "value": linear,
                "scores": linear, "probs": linear, "context": linear,
                "ffn_input": linear, "ffn_hidden": act}

    def _dense(self, x2d, name):
        """[N, d_in] @ [d_in, d_out] + b: a plain 2-D matmul, FULLY_CONNECTED in TFLite."""
        return tf.matmul(x2d, self._weight(f"{name}_kernel")) + self._weight(f"{name}_bias")

    def call(self, inputs, training=None, return_attention=False):
        """return_attention=True (used only by explain, never in the exported graph): also the attention
        weights [B, H, T, T] (query rows, key columns; each row sums to 1, padded keys get < 1e-6)."""
        x, mask = inputs
        x = tf.cast(x, self.compute_dtype)
        shape = tf.shape(x)
        if self.conv_width:
            x = x + self._convolution(x, mask, shape, training)
        pre = self.norm == "pre"  # pre: x + f(LN(x)); post (BERT): LN(x + f(x))
        y, attention = self._self_attention(self._norm("ln1", x) if pre else x, mask, shape, training)
        x = x + y if pre else self._norm("ln1", x + y)
        y = self._feed_forward(self._norm("ln2", x) if pre else x, shape, training)
        out = x + y if pre else self._norm("ln2", x + y)
        return (out, attention) if return_attention else out

    def _norm(self, name, x):
        """LayerNorm with the weights `<name>_gamma` and `<name>_beta`."""
        return layer_norm(x, self._weight(f"{name}_gamma"), self._weight(f"{name}_beta"), self.epsilon)

    def _convolution(self, x, mask, shape, training):
        """Conv(LN(x)) as one matmul: each token's window of conv_width neighbours is concatenated ([B*T, w*d] @
        [w*d, d], FULLY_CONNECTED in TFLite). Padded positions are zeroed first, so a token next to padding sees
        what it sees at the end of any sequence."""
        batch, length = shape[0], shape[1]
        keep = tf.reshape(tf.cast(mask, self.compute_dtype), [batch, length, 1])
        y = self._norm("ln0", x) * keep
        r = self.conv_width // 2
        y = tf.pad(y, [[0, 0], [r, r], [0, 0]])
        window = tf.concat([y[:, i:i + length] for i in range(self.conv_width)], axis=-1)
        window = self._point("conv_input", tf.reshape(window, [-1, self.conv_width * self.d_model]))
        y = self._point("conv_hidden", self._dense(window, "conv"))
        return self._conv_dropout(tf.reshape(y, shape), training=training)

    def _self_attention(self, y, mask, shape, training):
        """Masked multi-head self-attention of y [B, T, d]: (its output, the attention weights [B, H, T, T])."""
        batch, length = shape[0], shape[1]
        h, d = self.num_heads, self._head_dim
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
        if self.causal:  # [B, 1, T, T]: query i sees keys 0..i (a constant in a fixed-length export)
            keys = keys * tf.linalg.band_part(tf.ones([length, length], self.compute_dtype), -1, 0)
        pad = _PAD_LOGIT / _SCORE_LIMIT * limit
        scores = self._point("scores", scores * keys + (1.0 - keys) * tf.cast(pad, self.compute_dtype))
        probs = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)
        attention = probs = self._point("probs", tf.cast(probs, self.compute_dtype))
        probs = self._attn_dropout(probs, training=training)
        ctx = tf.reshape(tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3]), [-1, self.d_model])
        out = self._dense(self._point("context", ctx), "o")
        return self._out_dropout(tf.reshape(out, shape), training=training), attention

    def _feed_forward(self, y, shape, training):
        """GELU feed-forward network of y [B, T, d] (two FULLY_CONNECTED ops in TFLite)."""
        y = tf.reshape(self._point("ffn_input", y), [-1, self.d_model])
        y = self._point("ffn_hidden", self._dense(y, "ff1"))
        y = self._dense(y, "ff2")
        return self._ffn_dropout(tf.reshape(y, shape), training=training)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim, "dropout": self.dropout, "activation": self.activation,
                "epsilon": self.epsilon, "conv_width": self.conv_width, "norm": self.norm,
                "score_limit": self.score_limit, "causal": self.causal}
