"""tf.data and TFRecords: tokenized splits written as records, read back as padded or length-bucketed batches
for Keras (classification and masked-language-model pretraining)."""
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core.errors import PipelineError
from pipeline.text import tokenizer as tok

SHUFFLE_BUFFER = 100_000  # records; SST-2's 60k serialized examples take a few MB


# ---------------------------------------------------------------- writing


def tokenize_split(tokenizer, texts, max_chars):
    """Wordpiece ids (no [CLS]/[SEP]) of every text: one RaggedTensor [len(texts), None]."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(texts, tf.string)).batch(1024)
    return tf.concat(list(ds.map(lambda t: tok.wordpiece_ids(tokenizer, t, max_chars))), axis=0)


def write_tfrecord(path, ids, labels, seq_len, cls_id, sep_id):
    packed = tok.add_special_tokens(ids, seq_len, cls_id, sep_id)
    rows = np.split(packed.flat_values.numpy().astype(np.int64), packed.row_splits.numpy()[1:-1])
    assert len(rows) == len(labels), (len(rows), len(labels))
    with tf.io.TFRecordWriter(str(path)) as w:
        for row, label in zip(rows, labels):
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "input_word_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=row)),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            })).SerializeToString())


# ---------------------------------------------------------------- reading


def bucket_boundaries(seq_len) -> list[int]:
    """Seven length boundaries at seq_len/8, 2/8 ... 7/8 (a bucket holds lengths below its boundary)."""
    bounds = {int(round(seq_len * f / 8)) for f in range(1, 8)}
    return sorted(b for b in bounds if 2 < b <= seq_len)


def count_records(path) -> int:
    return int(tf.data.TFRecordDataset(str(path)).reduce(np.int64(0), lambda n, _: n + 1))


_FEATURES = {"input_word_ids": tf.io.RaggedFeature(tf.int64), "label": tf.io.FixedLenFeature([], tf.int64)}


def parse_record(record, seq_len):
    """One serialized example -> (int32 ids cut to seq_len, int32 label). Records longer than seq_len
    (written with a larger one) keep their final [SEP]."""
    ex = tf.io.parse_single_example(record, _FEATURES)
    ids = tf.cast(ex["input_word_ids"], tf.int32)
    n = tf.minimum(tf.shape(ids)[0], seq_len)
    return tf.concat([ids[: n - 1], ids[-1:]], axis=0), tf.cast(ex["label"], tf.int32)


def make_dataset(tfrecord_path, seq_len, batch_size, *, training: bool, bucketing: bool = True,
                 seed: int | None = None, epoch: tf.Variable | None = None, num_classes: int | None = None,
                 drop_remainder: bool = False):
    """Batches of ({"input_word_ids", "input_mask", "input_type_ids"}: int32 [b, len], label: int32 [b]),
    or labels one-hot float32 [b, num_classes] when num_classes is given (label smoothing needs them).

    training: shuffled each epoch, and batched by similar length (each batch padded to its longest
    member) when bucketing, else padded to seq_len. Eval: file order, padded to seq_len.
    No batch is ever dropped, unless drop_remainder (each length's last, smaller batch). With `epoch` (an int64 variable the trainer sets at the start of each
    epoch), epoch e's order depends only on (seed, e), so a resumed run sees the same order.
    """
    path = Path(tfrecord_path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    def parse(record):
        return parse_record(record, seq_len)

    def to_inputs(ids, label):
        mask = tf.cast(tf.not_equal(ids, 0), tf.int32)  # [PAD] (id 0) is never a real token
        if num_classes:
            label = tf.one_hot(label, num_classes)
        return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": tf.zeros_like(ids)}, label

    ds = tf.data.TFRecordDataset(str(path))
    if training and epoch is not None:
        # The whole file in memory (serialized records: a few MB for SST-2), permuted by a stateless
        # shuffle of (seed, epoch). flat_map reads the variable when an epoch's iteration starts,
        # after on_epoch_begin set it.
        records = tf.constant(list(ds.as_numpy_iterator()), dtype=tf.string)

        def epoch_records(_):
            key = tf.stack([tf.constant(seed or 0, tf.int64), epoch.read_value()])
            order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(records)[0]), seed=key)
            return tf.data.Dataset.from_tensor_slices(tf.gather(records, order))

        ds = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(epoch_records)
    elif training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and bucketing:
        bounds = bucket_boundaries(seq_len)
        ds = ds.bucket_by_sequence_length(
            lambda ids, label: tf.shape(ids)[0], bounds, [batch_size] * (len(bounds) + 1),
            padded_shapes=([None], []), drop_remainder=drop_remainder)
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=([seq_len], []), drop_remainder=drop_remainder)
    ds = ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE)
    if epoch is not None:
        # Batches per epoch do not depend on the order (each length bucket yields ceil(n / batch_size)).
        # Declaring the count lets Keras run exactly that many steps in every epoch; without it Keras
        # probes the first epoch of each fit() for its end, which costs an extra optimizer iteration
        # that a resumed run would spend at a different epoch.
        batches = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(tf.data.AUTOTUNE)


def shard_by_data(ds):
    """ds with DATA sharding: across several workers, each takes its share of every (global) batch, so a step sees
    the batch a single process would. FILE sharding needs at least as many files as workers; a split is one file
    (and training reads it into memory)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def split_arrays(path, seq_len):
    """(input dict of int32 [n, seq_len] arrays, labels [n]) of a processed split, in file order."""
    batches = list(make_dataset(path, seq_len, 1024, training=False).as_numpy_iterator())
    inputs = {k: np.concatenate([b[0][k] for b in batches]) for k in batches[0][0]}
    return inputs, np.concatenate([b[1] for b in batches])


def make_mlm_dataset(paths, seq_len, batch_size, vocab, mask_rate, *, training, seed=None):
    """Batches of ({input_word_ids, input_mask, mask_positions}, original ids at those positions, -1 for
    unused slots), masked on the fly by keras-nlp's MaskedLMMaskGenerator (BERT's 80/10/10); [PAD], [CLS]
    and [SEP] are never masked. Training batches group texts of similar length."""
    import keras_nlp  # here, not above: ~1 s to import, and only pretraining masks (tokenizer.py does the same)

    masker = keras_nlp.layers.MaskedLMMaskGenerator(
        vocabulary_size=len(vocab), mask_selection_rate=mask_rate, mask_token_id=vocab.index("[MASK]"),
        unselectable_token_ids=[vocab.index(t) for t in (tok.PAD, tok.CLS, tok.SEP)])

    def parse(record):
        return parse_record(record, seq_len)[0]

    def mask(ids):
        # Ragged selections padded to the batch's most masked text, not to a fixed length: with batches
        # of similar length the vocabulary projection, most of a step's cost, runs on few unused slots.
        out = masker(ids)
        target = tf.cast(out["mask_ids"], tf.int32).to_tensor(default_value=-1)
        return {"input_word_ids": tf.cast(out["token_ids"], tf.int32),
                "input_mask": tf.cast(tf.not_equal(ids, 0), tf.int32),
                "mask_positions": tf.cast(out["mask_positions"], tf.int32).to_tensor()}, target

    ds = tf.data.TFRecordDataset([str(p) for p in paths])
    if training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        bounds = bucket_boundaries(seq_len)
        ds = ds.bucket_by_sequence_length(lambda ids: tf.shape(ids)[0], bounds, [batch_size] * (len(bounds) + 1),
                                          padded_shapes=[None])
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=[None])
    return ds.map(mask, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
