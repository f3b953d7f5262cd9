"""Knowledge distillation: a smaller student trained on the teacher's soft labels and pooled sentence vectors over a
transfer set of train texts, augmented copies of them (Tang et al. 2019) and unlabelled texts."""
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.model.build import build_model, build_run_model, find_layer, logits_model, set_word_vectors
from pipeline.model.training import (LOG_EVERY, WarmupLinearDecay, current_learning_rate, make_optimizer,
                                     write_epoch_log)
from pipeline.text import vectors
from pipeline.text.dataset import split_arrays

BATCHES_PER_SORT = 50  # batches drawn together and sorted by length: little padding, still shuffled


def distillation_loss(teacher_logits, student_logits, gold, has_gold, temperature, alpha):
    """Mean over the batch of T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * cross-entropy of the student
    on the one-hot `gold` labels, counted only where has_gold is 1 (augmented and unlabelled texts have none)."""
    t = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    s = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    kl = tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)
    ce = -tf.reduce_sum(tf.cast(gold, tf.float32) * tf.nn.log_softmax(tf.cast(student_logits, tf.float32)), axis=-1)
    return tf.reduce_mean(temperature ** 2 * kl + alpha * tf.cast(has_gold, tf.float32) * ce)


def representation_loss(teacher_vectors, projected_student_vectors):
    """Mean over the batch of 1 - cos(teacher's pooled vector, the student's projected to the teacher's width)."""
    t = tf.math.l2_normalize(tf.cast(teacher_vectors, tf.float32), axis=-1)
    s = tf.math.l2_normalize(tf.cast(projected_student_vectors, tf.float32), axis=-1)
    return tf.reduce_mean(1.0 - tf.reduce_sum(t * s, axis=-1))


def augment(ids, length, rng, mask_id, mask_prob, ngram_prob):
    """An augmented copy of one text's ids ([CLS] ... [SEP], `length` real ids, padded): with ngram_prob
    only a random window of 1-5 wordpieces is kept, then each wordpiece becomes [MASK] with mask_prob."""
    body = ids[1:length - 1].copy()
    if len(body) > 1 and rng.random() < ngram_prob:
        n = int(rng.integers(1, 6))
        start = int(rng.integers(0, max(1, len(body) - n + 1)))
        body = body[start:start + n]
    body[rng.random(len(body)) < mask_prob] = mask_id
    out = np.zeros_like(ids)
    out[0], out[1:len(body) + 1], out[len(body) + 1] = ids[0], body, ids[length - 1]
    return out


def predict_outputs(model, ids, batch_size=256):
    """A model's outputs (each [B, width]) for padded ids [n, seq_len] as float32 arrays, batched by similar length,
    in input order."""
    lengths = (ids != 0).sum(1)
    order = np.argsort(lengths, kind="stable")
    shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    out = [np.zeros((len(ids), shape[-1]), np.float32) for shape in shapes]
    run = tf.function(lambda x: model(x, training=False), reduce_retracing=True)  # one trace for all widths
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        results = tf.nest.flatten(run(batch_inputs(ids[rows, :max(1, int(lengths[rows].max()))])))
        for array, result in zip(out, results):
            array[rows] = tf.cast(result, tf.float32).numpy()
    return out


def predict_logits(model, ids, batch_size=256):
    """Logits of a logits model for padded ids [n, seq_len], batched by similar length, in input order."""
    return predict_outputs(model, ids, batch_size)[0]


def logits_and_vectors(model):
    """A model sharing `model`'s layers whose outputs are its logits and its pooled sentence vectors."""
    logits = logits_model(model)
    return tf.keras.Model(model.inputs, [logits.output, model.get_layer("pooling").output],
                          name=f"{model.name}_vectors")


def labelling_copy(cfg, teacher, stats, vocab_size, num_classes, word_vectors):
    """The teacher rebuilt under train.mixed_precision, with its weights: it labels hundreds of thousands of
    texts, and bfloat16 halves its time on CPUs with bfloat16 units (logits within ~1% of float32's)."""
    if cfg.train.mixed_precision == "float32":
        return teacher
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.train.mixed_precision)
    try:
        copy = build_run_model(cfg, stats, vocab_size, num_classes, word_vectors)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    copy.set_weights(teacher.get_weights())
    return copy


def transfer_set(cfg, processed, seq_len, teacher, vocab, num_classes):
    """(ids [n, seq_len], teacher logits [n, C], one-hot gold [n, C], has_gold [n], teacher's pooled vectors [n, D]
    in float16): the train texts, each with distill.augment_copies augmented copies, and the unlabelled texts;
    the teacher's outputs computed once."""
    d = cfg.distill
    rng = np.random.default_rng(cfg.train.seed)
    train_x, train_y = split_arrays(processed / "train.tfrecord", seq_len)
    ids, lengths = train_x["input_word_ids"], train_x["input_mask"].sum(1)
    parts, gold = [ids], [np.eye(num_classes, dtype=np.float32)[train_y]]
    mask_id = vocab.index("[MASK]")
    for _ in range(d.augment_copies):
        parts.append(np.stack([augment(row, n, rng, mask_id, d.mask_prob, d.ngram_prob) for row, n in zip(ids, lengths)]))
        gold.append(np.zeros((len(ids), num_classes), np.float32))
    if (processed / "unlabeled.tfrecord").is_file():
        unlabeled = split_arrays(processed / "unlabeled.tfrecord", seq_len)[0]["input_word_ids"]
        parts.append(unlabeled)
        gold.append(np.zeros((len(unlabeled), num_classes), np.float32))
    ids, gold = np.concatenate(parts), np.concatenate(gold)
    t0 = time.perf_counter()
    logits, pooled = predict_outputs(logits_and_vectors(teacher), ids)
    print(f"distill: transfer set of {len(ids):,} texts ({len(train_y):,} train, {d.augment_copies} augmented "
          f"copies of each, {len(ids) - len(train_y) * (1 + d.augment_copies):,} unlabelled); the teacher's logits "
          f"and vectors in {time.perf_counter() - t0:.0f} s")
    return ids, logits, gold, (gold.sum(1) > 0).astype(np.float32), pooled.astype(np.float16)


def sorted_batches(n_rows, lengths, batch_size, rng):
    """Index batches of one epoch: shuffled, then sorted by length within groups of BATCHES_PER_SORT batches."""
    order = rng.permutation(n_rows)
    group = batch_size * BATCHES_PER_SORT
    batches = []
    for start in range(0, n_rows, group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_inputs(ids):
    """The model's input dict for a batch of padded ids (0 = padding)."""
    return {"input_word_ids": ids, "input_mask": (ids != 0).astype(np.int32), "input_type_ids": np.zeros_like(ids)}


def soft_label_dataset(ids, teacher_logits, batch_size, seed):
    """Endless batches of (inputs, the teacher's probabilities) over a transfer set, shuffled and padded per batch
    as sorted_batches makes them: what compress fine-tunes a pruned or quantized student on."""
    lengths = (ids != 0).sum(1)
    probabilities = tf.nn.softmax(tf.cast(teacher_logits, tf.float32)).numpy()

    def batches():
        rng = np.random.default_rng(seed)
        while True:
            for batch in sorted_batches(len(ids), lengths, batch_size, rng):
                yield batch_inputs(ids[batch, :int(lengths[batch].max())].astype(np.int32)), probabilities[batch]

    spec = tf.TensorSpec([None, None], tf.int32)
    return tf.data.Dataset.from_generator(batches, output_signature=(
        {"input_word_ids": spec, "input_mask": spec, "input_type_ids": spec},
        tf.TensorSpec([None, probabilities.shape[1]], tf.float32)))


def projected_embeddings(table, width):
    """The teacher's token embeddings [V, D] projected on their first `width` principal components, scaled to
    the student's initial spread (1/sqrt(width) per value): every wordpiece starts with what the pretrained
    teacher knows of it, also those the transfer set never shows the student."""
    centred = table - table.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:width].T
    if projected.shape[1] < width:  # a student wider than the teacher: the extra dimensions start at zero
        projected = np.pad(projected, [(0, 0), (0, width - projected.shape[1])])
    return (projected / max(float(projected.std()), 1e-12) * width ** -0.5).astype(np.float32)


def build_student(cfg, teacher, vocab_size, num_classes, seq_len, word_vectors=None):
    """The student: model.* with distill.student_* overridden, the teacher's n-gram term copied and frozen, the
    run's word vectors (vectors.load_table) when it has them."""
    d = cfg.distill
    ngrams = find_layer(teacher, "ngrams")
    student_cfg = dataclasses.replace(cfg.model, d_model=d.student_d_model, num_heads=d.student_num_heads,
                                      ff_dim=d.student_ff_dim, num_layers=d.student_num_layers,
                                      ngram_order=ngrams.order if ngrams else 0,
                                      ngram_buckets=ngrams.buckets if ngrams else cfg.model.ngram_buckets)
    student = build_model(student_cfg, vocab_size, num_classes, seq_len, **vectors.model_sizes(word_vectors))
    embedding, teacher_embedding = student.get_layer("embedding"), teacher.get_layer("embedding")
    if teacher_embedding.embeddings.shape[0] == embedding.embeddings.shape[0]:
        embedding.embeddings.assign(projected_embeddings(teacher_embedding.embeddings.numpy(), student_cfg.d_model))
    if word_vectors is not None:  # after the projection: tokens no training text has keep a zero embedding
        set_word_vectors(student, *word_vectors)
    if student_cfg.ngram_order:
        student.get_layer("ngrams").set_weights(teacher.get_layer("ngrams").get_weights())
        student.get_layer("ngrams").trainable = False
    return student, student_cfg


def vector_standardisation(vectors, chunk=65536):
    """(mean, standard deviation) per dimension of float16 vectors [n, D], as float32, summed in float64 chunks."""
    total, squares = np.zeros(vectors.shape[1]), np.zeros(vectors.shape[1])
    for start in range(0, len(vectors), chunk):
        part = vectors[start:start + chunk].astype(np.float64)
        total, squares = total + part.sum(0), squares + (part ** 2).sum(0)
    mean = total / max(len(vectors), 1)
    std = np.sqrt(np.maximum(squares / max(len(vectors), 1) - mean ** 2, 0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def train_student(cfg, student, data, dev, logdir, epoch_log=None):
    """Fit the student on the transfer set (ids, teacher logits, gold, has_gold, teacher's pooled vectors); keep
    the epoch with the best dev accuracy. Returns one row per epoch, also written to the CSV file `epoch_log`
    after each epoch (as training's epochs.csv: what the search's early stopping reads)."""
    d, t = cfg.distill, cfg.train
    ids, teacher_logits, gold, has_gold, teacher_vectors = data
    lengths = (ids != 0).sum(1)
    rng = np.random.default_rng(t.seed)
    steps = math.ceil(len(ids) / d.batch_size)
    # As in training, small data sets get more epochs: at least the texts of train.min_steps training batches
    # (3 epochs of tweet_emotion's transfer set, 460 batches of 32, left its student 3 points below its teacher
    # on test; 10 epochs: 1 point above).
    epochs = max(d.epochs, math.ceil(t.min_steps * t.batch_size / len(ids)))
    optimizer = make_optimizer(WarmupLinearDecay(d.learning_rate, int(0.1 * steps * epochs), steps * epochs),
                               t.weight_decay)
    student_logits, student_both = logits_model(student), logits_and_vectors(student)
    variables = list(student_logits.trainable_variables)
    if d.vector_weight:
        # The student's pooled vector, through a linear map used only here, learns the direction of the teacher's
        # (each dimension standardised over the transfer set, so a few large ones do not decide the cosine).
        projection = tf.keras.layers.Dense(teacher_vectors.shape[1], name="vector_projection")
        projection.build((None, student.get_layer("pooling").output.shape[-1]))
        centre, scale = vector_standardisation(teacher_vectors)
        variables += projection.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(x, tl, tv, g, h):
        with tf.GradientTape() as tape:
            logits, pooled = student_both(x, training=True)
            loss = distillation_loss(tl, logits, g, h, d.temperature, d.alpha)
            if d.vector_weight:
                loss += d.vector_weight * representation_loss((tf.cast(tv, tf.float32) - centre) / scale,
                                                              projection(pooled))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    dev_ids, dev_y = dev
    writer = tf.summary.create_file_writer(str(logdir))
    step_writer = tf.summary.create_file_writer(str(Path(logdir) / "steps"))
    rows, best, best_weights = [], -1.0, None
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for batch in sorted_batches(len(ids), lengths, d.batch_size, rng):
            inputs = batch_inputs(ids[batch, :int(lengths[batch].max())])
            losses.append(float(step(inputs, teacher_logits[batch], teacher_vectors[batch], gold[batch],
                                     has_gold[batch])))
            if len(losses) % LOG_EVERY == 0:  # a curve, not one dot per epoch
                with step_writer.as_default():
                    at = int(optimizer.iterations)
                    tf.summary.scalar("loss", np.mean(losses[-LOG_EVERY:]), step=at)
                    tf.summary.scalar("learning_rate", current_learning_rate(optimizer), step=at)
        accuracy = float(np.mean(predict_logits(student_logits, dev_ids).argmax(1) == dev_y))
        rows.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_accuracy": accuracy,
                     "epoch_seconds": time.perf_counter() - t0})
        with writer.as_default():
            for k in ("loss", "val_accuracy"):
                tf.summary.scalar(f"distill/{k}", rows[-1][k], step=epoch)
        print(f"distill: epoch {epoch + 1}/{epochs}: loss {rows[-1]['loss']:.4f}, dev accuracy {accuracy:.4f} "
              f"({rows[-1]['epoch_seconds']:.0f} s)", flush=True)
        if epoch_log:
            write_epoch_log(epoch_log, rows)
        if accuracy > best:
            best, best_weights = accuracy, student.get_weights()
    student.set_weights(best_weights)
    return rows
