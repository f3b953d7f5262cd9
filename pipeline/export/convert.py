"""TFLite conversion: the converter settings of each export mode (float32, dynamic_range, float16, int8), a
model's .tflite bytes at batch 1 and the run's sequence length, and int8 calibration data."""
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.model.build import serving_function
from pipeline.model.encoder import EncoderBlock
from pipeline.text.dataset import make_dataset


def configure_converter(converter, mode, representative=None):
    """Set a TFLite converter up for mode: float32 (no optimization), dynamic_range (int8 weights),
    float16 (float16 weights), int8 (full integer: ranges from the fake-quant ops of a QAT model where
    it has them, from calibration on `representative` elsewhere)."""
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None:
            raise ValueError("int8 export needs representative data")
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif mode not in ("float32", "dynamic_range"):
        raise ValueError(f"unknown export mode {mode!r}")
    return converter


def export_tflite(model, seq_len, mode, representative=None, float_ops=(), per_tensor=False):
    """TFLite bytes of `model` at batch 1 and a fixed seq_len, in one of the modes of configure_converter;
    int8 with `float_ops`: those op types stay float32 (the converter's quantization debugger denylist)."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(model, seq_len)], model)
    configure_converter(converter, mode, representative)
    # One scale per kernel, not per output channel: a clustered kernel then ships its k values, not k per channel.
    converter._experimental_disable_per_channel = per_tensor
    if mode != "int8" or not float_ops:
        return converter.convert()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options)
    return debugger.get_nondebug_quantized_model()


def representative_data(processed, seq_len, n, seed):
    """`n` shuffled training examples padded to seq_len, one per batch: int8 calibration input."""
    ds = make_dataset(processed / "train.tfrecord", seq_len, 1, training=True, bucketing=False, seed=seed)
    samples = [x for x, _ in ds.take(n)]

    def generate():
        for x in samples:
            yield x

    return generate


def dense_only_files(trained, seq_len, directory):
    """float32 and int8 .tflite files of the dense layers of `trained`'s encoder blocks alone: the same shapes
    (the convolution's matmul, four attention projections and the feed-forward pair per block) and residual adds,
    but no attention scores, norms, softmax or GELU. Their int8/float32 latency is the most int8 can gain for
    this model on this CPU."""
    blocks = [layer for layer in trained.layers if isinstance(layer, EncoderBlock)]
    d = blocks[0].d_model
    x = inputs = tf.keras.Input(shape=(seq_len, d), batch_size=1)
    for block in blocks:
        if block.conv_width:  # [T, w*d] @ [w*d, d], as the block computes it
            window = tf.keras.layers.Concatenate()([x] * block.conv_width)
            x = tf.keras.layers.Add()([x, tf.keras.layers.Dense(d, activation="relu")(window)])
        h = x
        for _ in range(4):
            h = tf.keras.layers.Dense(d)(h)
        x = tf.keras.layers.Add()([x, h])
        h = tf.keras.layers.Dense(block.ff_dim, activation="relu")(x)
        x = tf.keras.layers.Add()([x, tf.keras.layers.Dense(d)(h)])
    model = tf.keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    representative = lambda: ([rng.normal(size=(1, seq_len, d)).astype(np.float32)] for _ in range(20))  # noqa: E731
    paths = []
    for mode in ("float32", "int8"):
        converter = configure_converter(tf.lite.TFLiteConverter.from_keras_model(model), mode, representative)
        paths.append(Path(directory) / f"dense_only_{mode}.tflite")
        paths[-1].write_bytes(converter.convert())
    return paths
