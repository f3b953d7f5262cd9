"""Pretraining stage: masked-language-model training of the encoder on every train text and the data
directory's unlabelled texts, so that `make train` starts from an encoder that already knows the language."""
import json
import math
import shutil
import sys
from pathlib import Path

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline.core import files
from pipeline.core import manifest
from pipeline.text import vectors
from pipeline.core.config import save_config
from pipeline.core.errors import PipelineError

ENCODER_KEYS = ("d_model", "num_layers", "num_heads", "ff_dim", "conv_width", "dropout", "token_dropout", "position")
SHUFFLE_BUFFER = 100_000
_register = tf.keras.utils.register_keras_serializable(package="liteformer")


@_register
def masked_lm_loss(y_true, logits):
    """Mean cross-entropy over the masked positions; y_true holds the original ids, -1 where nothing was masked."""
    y = tf.cast(y_true, tf.int32)
    w = tf.cast(y >= 0, tf.float32)
    ce = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(y, 0), logits, from_logits=True)
    return tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)


@_register
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


@_register
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


def make_mlm_dataset(paths, seq_len, batch_size, vocab, mask_rate, *, training, seed=None):
    """Batches of ({input_word_ids, input_mask, mask_positions}, original ids at those positions, -1 for
    unused slots), masked on the fly by keras-nlp's MaskedLMMaskGenerator (BERT's 80/10/10); [PAD], [CLS]
    and [SEP] are never masked. Training batches group texts of similar length."""
    import keras_nlp

    from pipeline.stages.data import bucket_boundaries, parse_record
    from pipeline.text.tokenizer import CLS, PAD, SEP

    masker = keras_nlp.layers.MaskedLMMaskGenerator(
        vocabulary_size=len(vocab), mask_selection_rate=mask_rate, mask_token_id=vocab.index("[MASK]"),
        unselectable_token_ids=[vocab.index(t) for t in (PAD, CLS, SEP)])

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


def stage_key(cfg, processed):
    """What the pretrained encoder depends on: the encoder's config, pretrain's, and the processed texts."""
    names = ["train.tfrecord", "dev.tfrecord", "vocab.txt", "stats.json"]
    names += [n for n in ("unlabeled.tfrecord", vectors.FILE_NAME) if (processed / n).is_file()]
    model = cfg.to_dict()["model"]
    return {"config": {"data": cfg.to_dict()["data"], "model": {k: model[k] for k in ENCODER_KEYS},
                       "pretrain": cfg.to_dict()["pretrain"]},
            "inputs": manifest.inputs(processed, names, "processed")}


def pretrain_encoder(cfg, processed, seq_len, state, logdir, key):
    """Fit the encoder with an MLM head on the run's texts; return (MLM model, epoch rows)."""
    from pipeline.model.layers import build_mlm_model, set_word_vectors
    from pipeline.text.tokenizer import load_vocabulary
    from pipeline.stages.train import EpochTimer, StepLog, WarmupLinearDecay, make_optimizer, read_epoch_log

    p = cfg.pretrain
    if not 0 < p.mask_rate < 1:
        raise PipelineError(f"pretrain.mask_rate must be in (0, 1), got {p.mask_rate}")
    if p.epochs < 1 or p.batch_size < 1:
        raise PipelineError(f"pretrain.epochs and pretrain.batch_size must be positive, got {p.epochs} and {p.batch_size}")
    vocab = load_vocabulary(processed / "vocab.txt")
    tf.keras.utils.set_random_seed(p.seed)
    sources = [processed / "train.tfrecord"] + [f for f in [processed / "unlabeled.tfrecord"] if f.is_file()]
    train_ds = make_mlm_dataset(sources, seq_len, p.batch_size, vocab, p.mask_rate, training=True, seed=p.seed)
    dev_ds = make_mlm_dataset([processed / "dev.tfrecord"], seq_len, p.batch_size, vocab, p.mask_rate, training=False)
    steps = int(train_ds.reduce(0, lambda n, _: n + 1))  # per epoch, whatever the order (see make_dataset)
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps))
    total = steps * p.epochs
    print(f"pretraining the encoder: masked language model, {p.mask_rate:.0%} of wordpieces masked, "
          f"{p.epochs} epochs of {steps:,} steps over {', '.join(s.name for s in sources)}")

    word_vectors = vectors.load_table(processed)
    model = build_mlm_model(cfg.model, len(vocab), seq_len, **vectors.model_sizes(word_vectors))
    if word_vectors is not None:
        set_word_vectors(model, *word_vectors)
    schedule = WarmupLinearDecay(p.learning_rate, int(p.warmup_fraction * total), total)
    model.compile(optimizer=make_optimizer(schedule, p.weight_decay), loss=masked_lm_loss,
                  metrics=[MaskedAccuracy(), MaskedPerplexity()])
    if manifest.work_dir(state, key, resumable=lambda d: (d / "backup").exists()):
        print(f"resuming the interrupted pretraining in {state}")
    log = state / "epochs.csv"
    model.fit(train_ds, validation_data=dev_ds, epochs=p.epochs,
              verbose=1 if sys.stdout.isatty() else 2, callbacks=[
                  EpochTimer(), tf.keras.callbacks.TerminateOnNaN(),
                  tf.keras.callbacks.CSVLogger(str(log), append=True),
                  tf.keras.callbacks.BackupAndRestore(str(state / "backup")),
                  tf.keras.callbacks.TensorBoard(str(logdir)), StepLog(logdir)])
    rows = read_epoch_log(log)
    if not rows or any(not math.isfinite(r.get("loss", math.nan)) for r in rows):
        raise PipelineError(f"{state}: pretraining diverged (loss is NaN); lower pretrain.learning_rate and run again")
    return model, rows


def run_pretrain_stage(cfg, run):
    """`python -m pipeline pretrain`: write saved_models/<run>/pretrained/ (MLM model, config, history)."""
    from pipeline.stages.train import load_processed

    if cfg.model.backbone != "none":
        raise PipelineError(f"pretrain: model.backbone is {cfg.model.backbone}, already pretrained; train fine-tunes it")
    processed, stats, _ = load_processed(cfg, run)
    model_dir = Path(cfg.paths.models) / run
    key = stage_key(cfg, processed)
    if manifest.up_to_date(model_dir, "pretrain", key):
        return json.loads((model_dir / "pretrained" / "summary.json").read_text())
    manifest.begin(model_dir, "pretrain")
    state = model_dir / "pretrain_state"
    model, rows = pretrain_encoder(cfg, processed, int(stats.get("encoder_len", stats["seq_len"])), state,
                                   Path(cfg.paths.runs) / run / "pretrain", key)
    last = rows[-1]
    unlabeled = (stats.get("unlabeled") or {}).get("rows", 0)
    summary = {"texts": stats["rows"]["train"] + unlabeled, "unlabeled_texts": unlabeled,
               "epochs": len(rows), "seconds": round(sum(r.get("epoch_seconds", 0.0) for r in rows), 1),
               "dev_masked_accuracy": last.get("val_masked_accuracy"), "dev_perplexity": last.get("val_perplexity")}
    with files.atomic_path(model_dir / "pretrained") as tmp:
        tmp.mkdir()
        model.save(tmp / "model.keras")
        save_config(cfg, tmp / "config.yaml")
        files.write_json(tmp / "history.json", rows)
        files.write_json(tmp / "summary.json", summary)
    manifest.record(model_dir, "pretrain", key, ["pretrained"])
    shutil.rmtree(state / "backup", ignore_errors=True)
    print(f"pretrained {run}: dev masked-token accuracy {summary['dev_masked_accuracy']:.4f}, perplexity "
          f"{summary['dev_perplexity']:.1f}, {summary['epochs']} epochs in {summary['seconds']:.0f} s -> "
          f"{model_dir / 'pretrained'}")
    return summary
