"""Pretraining stage (`make pretrain`): masked-language-model training of the encoder on every train text and the
data directory's unlabelled texts, so that `make train` starts from an encoder that already knows the language;
writes saved_models/<run>/pretrained/. The MLM head, loss and metrics are in pipeline/model/mlm.py."""
import json
import math
import shutil
import sys
from pathlib import Path

import tensorflow as tf

from pipeline.core import files, manifest
from pipeline.core.config import save_config
from pipeline.core.errors import PipelineError
from pipeline.text import vectors
from pipeline.text.dataset import make_mlm_dataset
from pipeline.text.processed import load_processed
from pipeline.text.tokenizer import load_vocabulary

ENCODER_KEYS = ("d_model", "num_layers", "num_heads", "ff_dim", "conv_width", "dropout", "token_dropout", "position")


def run_pretrain_stage(cfg, run):
    """`python -m pipeline pretrain`: write saved_models/<run>/pretrained/ (MLM model, config, history)."""
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
    summary = summarise(stats, rows)
    write_pretrained(model_dir / "pretrained", cfg, model, rows, summary)
    manifest.record(model_dir, "pretrain", key, ["pretrained"])
    shutil.rmtree(state / "backup", ignore_errors=True)
    print(f"pretrained {run}: dev masked-token accuracy {summary['dev_masked_accuracy']:.4f}, perplexity "
          f"{summary['dev_perplexity']:.1f}, {summary['epochs']} epochs in {summary['seconds']:.0f} s -> "
          f"{model_dir / 'pretrained'}")
    return summary


def summarise(stats, rows):
    """summary.json: the texts the encoder learned from, its epochs and time, its last dev scores."""
    last = rows[-1]
    unlabeled = (stats.get("unlabeled") or {}).get("rows", 0)
    return {"texts": stats["rows"]["train"] + unlabeled, "unlabeled_texts": unlabeled,
            "epochs": len(rows), "seconds": round(sum(r.get("epoch_seconds", 0.0) for r in rows), 1),
            "dev_masked_accuracy": last.get("val_masked_accuracy"), "dev_perplexity": last.get("val_perplexity")}


def write_pretrained(out, cfg, model, rows, summary):
    """saved_models/<run>/pretrained/, whole: the MLM model, config.yaml, history.json and summary.json."""
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        model.save(tmp / "model.keras")
        save_config(cfg, tmp / "config.yaml")
        files.write_json(tmp / "history.json", rows)
        files.write_json(tmp / "summary.json", summary)


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
    # imported here, not above: the model code loads TFMOT (~1 s), which an up-to-date pretrain stage does without
    from pipeline.model.build import build_mlm_model, set_word_vectors
    from pipeline.model.mlm import MaskedAccuracy, MaskedPerplexity, masked_lm_loss
    from pipeline.model.training import EpochTimer, StepLog, WarmupLinearDecay, make_optimizer, read_epoch_log

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
