"""Token streams -> training windows (inputs, next-token targets) and the tf.data pipeline that samples them."""
from pathlib import Path

import numpy as np
import tensorflow as tf


def read_text(path):
    """A UTF-8 text file; ValueError (naming the file) when it is empty."""
    text = Path(path).read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"{path}: empty text")
    return text


def check_length(tokens, context, name):
    """ValueError naming `name` when the stream cannot fill one window of `context` inputs + 1 target."""
    if len(tokens) == 0:
        raise ValueError(f"{name}: empty text")
    if len(tokens) < context + 1:
        raise ValueError(f"{name}: {len(tokens)} tokens, too short for one window of {context} (+1 target)")


def windows(tokens, context, stride=None):
    """All windows of context+1 tokens every `stride` (default: non-overlapping) as (inputs, targets) arrays."""
    tokens = np.asarray(tokens, np.int32)
    stride = stride or context
    starts = np.arange(0, len(tokens) - context, stride)
    rows = np.stack([tokens[s:s + context + 1] for s in starts])
    return rows[:, :-1], rows[:, 1:]


def training_dataset(tokens, context, batch_size, seed=0, name="train"):
    """An endless tf.data stream of (inputs [B, T], targets [B, T]) int32 windows starting at uniformly random
    offsets (nanoGPT's sampling: every offset is a window start, so no epoch boundary and no fixed cut)."""
    check_length(tokens, context, name)
    table = tf.constant(np.asarray(tokens, np.int32))
    span = len(tokens) - context  # start offsets 0 .. span-1

    def cut(r):
        start = tf.cast(r % span, tf.int32)
        row = table[start:start + context + 1]
        return row[:-1], row[1:]

    ds = tf.data.Dataset.random(seed=seed).map(cut, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
