"""Training stage (`make train`): fit the Transformer on a processed run, keep the best epoch, fit the n-gram term
and the bag-of-words baseline, and write saved_models/<run>/. How a model is built and trained is in
pipeline/model/ (build.py, training.py)."""
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pipeline.core import files, manifest
from pipeline.core.config import LM_COMPRESS_KEYS, save_config
from pipeline.core.errors import PipelineError
from pipeline.lm.config import LMConfig
from pipeline.lm.kneser_ney import KneserNey
from pipeline.lm.measure import score_keras
from pipeline.lm.train import train_lm
from pipeline.measure.baseline import run_baseline
from pipeline.measure.compare import comparison_table
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.predictors import load_predictor
from pipeline.measure.privacy import noise_for_epsilon, privacy_line, privacy_record
from pipeline.model import ngram
from pipeline.model.build import build_run_model, find_layer, initialize_encoder, set_word_vectors
from pipeline.model.privacy import make_dp_optimizer, per_example_loss, train_only_head
from pipeline.model.spec import model_config
from pipeline.model.training import (EpochTimer, ResumableEarlyStopping, ResumableModelCheckpoint, SetEpoch,
                                     StepBudget, StepLog, WarmupLinearDecay, best_in_log, epochs_for, is_chief,
                                     loss_class_weights, make_optimizer, make_strategy, read_epoch_log, step_limit,
                                     steps_for, train_key, weigh_by_class, worker_counts)
from pipeline.text import vectors
from pipeline.text.dataset import make_dataset, shard_by_data, split_arrays
from pipeline.text.processed import load_processed, load_stats, processed_dir
from pipeline.text.read import read_examples
from pipeline.text.tokenizer import load_vocabulary

ARTIFACTS = ("model.keras", "saved_model", "vocab.txt", "labels.txt", "preprocess.json", "config.yaml",
             "history.json", "metrics.json", "baseline")


def run_train_stage(cfg, run):
    """`python -m pipeline train`: train, evaluate on dev, and write saved_models/<run>/."""
    if (processed_dir(cfg, run) / "stats.json").is_file() and load_stats(processed_dir(cfg, run)).get("task") == "lm":
        return run_lm_train_stage(cfg, run)
    strategy = make_strategy(cfg.train.strategy)  # before any other TensorFlow op (several workers need that)
    chief = is_chief(strategy)
    processed, _, _ = load_processed(cfg, run)
    model_dir = Path(cfg.paths.models) / run
    key = train_key(cfg, processed, model_dir)
    # the chief's view decides for all workers: another machine's saved_models/ may not have the run
    if worker_counts(strategy, chief and manifest.up_to_date(model_dir, "train", key))[0]:
        return json.loads((model_dir / "metrics.json").read_text()) if chief else None
    if not chief:
        return train_as_worker(cfg, run, strategy)
    manifest.begin(model_dir, "train")
    model, rows, stats, labels, init, privacy = train_model(cfg, run, key, strategy)
    mix = fit_ngram_term(cfg, model, processed, stats, labels) if find_layer(model, "ngrams") else None
    save_model(model_dir, cfg, model, processed, stats, rows)
    splits, scores = score(cfg, processed, model_dir, labels)
    baseline = run_baseline(splits, model_dir / "baseline", labels)
    print(f"bag-of-words baseline (TF-IDF + logistic regression) fitted in {baseline.pop('fit_seconds'):.0f} s "
          f"-> {baseline.pop('path')}")  # out of metrics.json, which a rerun reproduces byte for byte
    best = int(best_in_log(rows, cfg.train.monitor, (lambda a, b: a < b) if cfg.train.monitor == "val_loss"
                           else (lambda a, b: a > b))[1])
    metrics = {
        **scores,
        "baseline": baseline,
        "init": init,
        "epochs": len(rows),
        "best_epoch": best + 1,
        "params": int(model.count_params()),
        "seq_len": int(stats["seq_len"]),
        **({"ngrams": mix} if mix else {}),
        **({"privacy": privacy} if privacy else {}),
    }
    files.write_json(model_dir / "metrics.json", metrics)
    manifest.record(model_dir, "train", key, ARTIFACTS)
    shutil.rmtree(model_dir / "train_state" / "backup", ignore_errors=True)
    seconds, dev = sum(r.get("epoch_seconds", 0.0) for r in rows), scores["dev"]
    print(f"trained {run}: dev accuracy {dev['accuracy']:.4f}, macro F1 {dev['macro_f1']:.4f}, "
          f"{len(rows)} epochs (best {best + 1}) in {seconds:.0f} s -> {model_dir}")
    print(comparison_table(scores, baseline))
    if privacy:
        print(privacy_line(privacy))
    return metrics


# ---------------------------------------------------------------- a language-model run (data.task lm)

LM_ARTIFACTS = ("model.keras", "tokenizer.json", "config.json", "config.yaml", "history.json", "metrics.json")
LM_SPLITS = ("train", "dev", "test")


def run_lm_train_stage(cfg, run):
    """Train the causal Transformer on data/processed/<run>/train.txt (pipeline/lm/train.py), score dev and test,
    fit the Kneser-Ney baseline on the same characters, and write saved_models/<run>/."""
    print("task: lm (the processed run is a language-model run)")
    processed, model_dir = processed_dir(cfg, run), Path(cfg.paths.models) / run
    names = [f"{s}.txt" for s in LM_SPLITS if (processed / f"{s}.txt").is_file()]
    section = {k: v for k, v in cfg.to_dict(lm=True)["lm"].items() if k not in LM_COMPRESS_KEYS}
    key = {"config": {"lm": section}, "inputs": manifest.inputs(processed, names, "processed")}
    if manifest.up_to_date(model_dir, "train", key):
        return json.loads((model_dir / "metrics.json").read_text())
    manifest.begin(model_dir, "train")
    texts = {n.removesuffix(".txt"): (processed / n).read_text(encoding="utf-8") for n in names}
    lm_cfg, log_dir = lm_config(cfg), Path(cfg.paths.runs) / run / "train"
    try:
        model, tokenizer, metrics = train_lm(lm_cfg, texts["train"], texts["dev"], model_dir, log_dir=log_dir,
                                             name=str(processed / "train.txt"))
    except ValueError as e:  # a text too short for one window
        raise PipelineError(str(e)) from None
    if "test" in texts:
        metrics["test"] = score_keras(model, tokenizer, texts["test"], lm_cfg.context)
    metrics["baseline"] = kneser_ney_baseline(cfg.lm.baseline_order, tokenizer, texts)
    files.write_json(model_dir / "metrics.json", metrics)
    save_config(cfg, model_dir / "config.yaml", lm=True)
    manifest.record(model_dir, "train", key, LM_ARTIFACTS)
    dev = metrics["dev"]
    print(f"trained {run}: dev {dev['bits_per_char']:.4f} bits per char, cross-entropy {dev['nats_per_token']:.4f} "
          f"nats/token, perplexity {dev['perplexity']:.3f}, next-token accuracy {dev['accuracy']:.4f}, "
          f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s -> {model_dir}")
    print(lm_comparison(metrics))
    return metrics


def lm_config(cfg) -> LMConfig:
    """The library's LMConfig from the config file's lm section (its other fields keep their defaults)."""
    section = cfg.to_dict(lm=True)["lm"]
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    return LMConfig(**{k: v for k, v in section.items() if k in fields})


def kneser_ney_baseline(order, tokenizer, texts) -> dict:
    """The interpolated Kneser-Ney n-gram model of train's characters, scored on dev (and test)."""
    vocab = tokenizer.vocab_size
    while order > 1 and vocab ** order >= 2 ** 62:  # its n-gram codes are int64
        order -= 1
    started = time.time()
    kn = KneserNey(order).fit(tokenizer.encode(texts["train"]), vocab)
    out = {s: kn.score(tokenizer.encode(texts[s]), len(texts[s])) for s in ("dev", "test") if s in texts}
    print(f"Kneser-Ney {order}-gram baseline fitted and scored in {time.time() - started:.0f} s")
    return {"model": f"interpolated Kneser-Ney {order}-gram of characters", "order": order, **out}


def lm_comparison(metrics) -> str:
    """One line per split: the model's bits per character against the n-gram baseline's."""
    lines = []
    for split in ("dev", "test"):
        if split in metrics and split in metrics["baseline"]:
            m, b = metrics[split]["bits_per_char"], metrics["baseline"][split]["bits_per_char"]
            verdict = "the model beats the n-gram baseline" if m < b else "the n-gram baseline is better"
            lines.append(f"{split}: model {m:.4f} bits per char, {metrics['baseline']['order']}-gram baseline "
                         f"{b:.4f} (Δ {m - b:+.4f}): {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- training


def train_model(cfg, run, key, strategy):
    """Fit a model on data/processed/<run>; return (model with the best weights, epoch rows, stats, labels,
    "pretrained" or "scratch", metrics.json's "privacy" record or None).
    key: the stage's manifest key, which an interrupted run must share to be resumed."""
    model, train_ds, dev_ds, epoch, plan, build, init = prepare(cfg, run, strategy)
    state = Path(cfg.paths.models) / run / "train_state"
    fit(cfg, model, train_ds, dev_ds, epoch, plan,
        SimpleNamespace(state=state, out=state, logdir=Path(cfg.paths.runs) / run / "train"),
        resumed=lambda: manifest.work_dir(state, key, resumable=lambda d: (d / "backup").exists()))
    rows = read_epoch_log(state / "epochs.csv")
    if not rows or any(not math.isfinite(r.get("loss", math.nan)) for r in rows):
        raise PipelineError(f"{state}: training diverged (loss is NaN); lower train.learning_rate and run again")
    privacy = None
    if plan.noise is not None:  # ε of the steps taken (early stopping may end before plan.total_steps)
        privacy = privacy_record(plan.t, int(plan.stats["rows"]["train"]), plan.noise, plan.steps_taken)
    if plan.t.mixed_precision != "float32" or cfg.train.strategy != "default" or privacy:
        # Saved as a float32 model (the variables are float32 already): evaluate, compress's QAT (FakeQuant has
        # no bfloat16 kernel) and the float32 export then compute what they load, in float32. And as a model of
        # this process alone: what follows (n-gram fit, saving, scoring) runs on the chief only, and a
        # distributed model's predict or save would wait for the other workers. And (privacy) a model without
        # the DP optimizer, whose class Keras could not load from model.keras.
        tf.keras.mixed_precision.set_global_policy("float32")
        model = build()
    # A TF checkpoint, not .h5: .h5 weights fail to load under MirroredStrategy in tf-keras 2.21.
    model.load_weights(str(state / "best" / "weights")).expect_partial()
    return model, rows, plan.stats, plan.labels, init, privacy


def train_as_worker(cfg, run, strategy):
    """A non-chief worker's part of `train`: the same fit, in step with the chief; what it writes (epoch log, best
    weights, TensorBoard) goes to a temporary directory, deleted after. Reads the chief's train_state/ to resume,
    so that must be on a filesystem all workers share. Returns None: the chief writes the run's files."""
    scratch = Path(tempfile.mkdtemp(prefix=f"liteformer-worker{strategy.cluster_resolver.task_id}-"))
    try:
        model, train_ds, dev_ds, epoch, plan, _, _ = prepare(cfg, run, strategy)
        state = Path(cfg.paths.models) / run / "train_state"
        fit(cfg, model, train_ds, dev_ds, epoch, plan, SimpleNamespace(state=state, out=scratch, logdir=scratch),
            resumed=lambda: False)  # the chief decides
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{strategy.cluster_resolver.task_type} {strategy.cluster_resolver.task_id}: trained with the chief, "
          f"which writes {Path(cfg.paths.models) / run}")
    return None


def prepare(cfg, run, strategy):
    """(model compiled in the strategy's scope, train and dev batches, the epoch variable, the plan, a function
    that builds the model again, "pretrained" or "scratch")."""
    processed, stats, labels = load_processed(cfg, run)
    vocab = load_vocabulary(processed / "vocab.txt")
    word_vectors = vectors.load_table(processed)
    set_up_tensorflow(cfg.train)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds, dev_ds, plan = datasets(cfg, processed, stats, labels, epoch)
    plan.stats, plan.labels = stats, labels

    def build():
        return build_run_model(cfg, stats, len(vocab), len(labels), word_vectors)

    with strategy.scope():
        model = build()
        init = initialize_encoder(cfg, model, Path(cfg.paths.models) / run)
        if word_vectors is not None:  # (a pretrained encoder has them, but MLM's random tokens touched unseen rows)
            set_word_vectors(model, *word_vectors)
        if private_head(plan.t):
            train_only_head(model)
        compile_model(model, plan)
    return model, train_ds, dev_ds, epoch, plan, build, init


def set_up_tensorflow(t):
    """Seeds, deterministic ops, dropout from tf.random.Generator states (saved with each epoch's backup) and the
    mixed-precision policy of train.* (float32 with train.privacy: DP-SGD clips and noises float32 gradients)."""
    tf.keras.utils.set_random_seed(t.seed)
    tf.config.experimental.enable_op_determinism()
    tf.keras.backend.experimental.enable_tf_random_generator()  # dropout from tf.random.Generator states
    tf.keras.mixed_precision.set_global_policy("float32" if t.privacy else t.mixed_precision)


def datasets(cfg, processed, stats, labels, epoch):
    """(train batches weighted by class, dev batches, the plan: train.* with the step limit, epochs, steps and class
    weights), and prints the plan."""
    seq_len, t = int(stats["seq_len"]), cfg.train
    # DP microbatches must divide every batch: then the last, smaller batch of each length is dropped
    train_ds = make_dataset(processed / "train.tfrecord", seq_len, t.batch_size, training=True,
                            bucketing=t.bucketing, seed=t.seed, epoch=epoch, num_classes=len(labels),
                            drop_remainder=bool(t.privacy and t.privacy_microbatches))
    dev_ds = make_dataset(processed / "dev.tfrecord", seq_len, t.batch_size, training=False, num_classes=len(labels))
    mean_len = stats["train_encoder_mean_len"]
    t = dataclasses.replace(t, max_steps=step_limit(t, mean_len), mixed_precision="float32" if t.privacy
                            else t.mixed_precision,
                            learning_rate=t.privacy_head_learning_rate if private_head(t) else t.learning_rate)
    plan = SimpleNamespace(t=t, epochs=epochs_for(t, int(train_ds.cardinality())),
                           total_steps=steps_for(t, int(train_ds.cardinality())),
                           weights=loss_class_weights(t, stats, labels))
    weights = plan.weights
    print(f"training {plan.epochs} epochs at most ({plan.total_steps:,} steps; train.epochs {t.epochs}, train.min_steps "
          f"{t.min_steps:,}, step limit {t.max_steps:,}: train.max_steps {cfg.train.max_steps:,}, train.max_tokens "
          f"{cfg.train.max_tokens:,} at {mean_len:.0f} wordpieces a text), early stopping on {t.monitor} after "
          f"{t.patience}; class weights "
          + (", ".join(f"{l} {w:.2f}" for l, w in zip(labels, weights.values())) if weights else "none"))
    if cfg.model.ngram_order and not model_config(cfg, stats).ngram_order:
        print("n-gram term: off " + ("(train.privacy: its closed-form fit on train is not private)" if t.privacy else
              f"(train has {stats['rows']['train']:,} rows, more than model.ngram_max_rows "
              f"{cfg.model.ngram_max_rows:,})"))
    plan.noise = privacy_noise(t, int(stats["rows"]["train"]), plan.total_steps) if t.privacy else None
    return shard_by_data(weigh_by_class(train_ds, weights)), shard_by_data(dev_ds), plan


def privacy_noise(t, train_rows, total_steps):
    """train.privacy_noise_multiplier, or the smallest whose ε at δ = 1/n after total_steps is at most
    train.privacy_target_epsilon; prints the DP-SGD plan."""
    q, delta = t.batch_size / train_rows, 1.0 / train_rows
    noise = t.privacy_noise_multiplier or noise_for_epsilon(t.privacy_target_epsilon, q, total_steps, delta)
    target = (f" (the smallest for ε <= {t.privacy_target_epsilon:g} at δ = 1/n over {total_steps:,} steps)"
              if t.privacy_target_epsilon else "")
    each = f"microbatch's ({t.privacy_microbatches} a batch)" if t.privacy_microbatches else "example's"
    trains = (f"the classifier head on the backbone's frozen features (train.privacy_train head), learning rate "
              f"{t.learning_rate:g}" if private_head(t) else "the whole model (train.privacy_train all)")
    print(f"privacy: DP-SGD trains {trains} (Adam; train.weight_decay unused), each {each} gradient clipped to L2 norm "
          f"{t.privacy_l2_norm_clip:g}, noise multiplier {noise:.4f}{target}; sampling rate {q:.2e}, float32")
    return noise


def private_head(t):
    """Whether DP-SGD trains only the classifier head (train.privacy_train head)."""
    return t.privacy and t.privacy_train == "head"


def compile_model(model, plan):
    """AdamW on the warmup-then-decay schedule (DP Adam with train.privacy), label-smoothed cross-entropy,
    accuracy."""
    t = plan.t
    # Keras keeps dropout's generator states out of checkpoints on purpose; listing them on the
    # model puts them into BackupAndRestore's, so a resumed run continues the same random stream.
    model.dropout_generators = [layer._random_generator._generator for layer in model.submodules
                                if isinstance(layer, tf.keras.layers.Dropout)]
    schedule = WarmupLinearDecay(t.learning_rate, int(t.warmup_fraction * plan.total_steps), plan.total_steps)
    private = plan.noise is not None
    model.compile(
        optimizer=make_dp_optimizer(schedule, t.privacy_l2_norm_clip, plan.noise, t.privacy_microbatches)
        if private else make_optimizer(schedule, t.weight_decay),
        loss=per_example_loss(t.label_smoothing) if private
        else tf.keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing),
        metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def fit(cfg, model, train_ds, dev_ds, epoch, plan, where, resumed):
    """model.fit, resumable from where.state (train_state/, whose backup/ every worker reads); the epoch log, best
    weights and TensorBoard logs go to where.out and where.logdir. resumed(): whether a resume is due (the chief's
    answer counts; it empties train_state/ when not)."""
    strategy = model.distribute_strategy
    resuming = worker_counts(strategy, resumed())[0]  # also a barrier: train_state/ is settled after it
    seen, workers = worker_counts(strategy, (where.state / "backup").exists(), True)
    if resuming and seen < workers:  # every worker must restore the same epoch, or they train out of step
        raise PipelineError(f"{where.state / 'backup'}: only {seen} of {workers} workers see it; resuming on "
                            "several machines needs saved_models/ on a filesystem they share")
    if resuming:
        print(f"resuming the interrupted run in {where.state}")
    _log_hparams(cfg, where.logdir)
    callbacks = build_callbacks(cfg, where, epoch) + [StepBudget(plan.total_steps)]
    model.fit(train_ds, validation_data=dev_ds, epochs=plan.epochs, callbacks=callbacks,
              verbose=1 if sys.stdout.isatty() else 2)
    # all steps taken: the best epoch's weights are chosen from all epochs' (restoring them resets the counter)
    plan.steps_taken = int(tf.keras.backend.get_value(model.optimizer.iterations))


def _log_hparams(cfg, logdir):
    """The data, model and train config as TensorBoard hyperparameters of the run."""
    flat = {f"{s}.{k}": v for s, d in cfg.to_dict().items() if s in ("data", "model", "train") for k, v in d.items()}
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams(flat)


def build_callbacks(cfg, where, epoch):
    """Order matters: the timer fills the logs first, and the epoch log is written before the backup,
    so a kill between the two only logs an epoch twice (read_epoch_log keeps the last). A resume's best epoch
    and patience come from the chief's epoch log (where.state), which every worker reads."""
    log = where.state / "epochs.csv"
    monitor = cfg.train.monitor
    return [
        SetEpoch(epoch),
        EpochTimer(),
        tf.keras.callbacks.TerminateOnNaN(),
        ResumableModelCheckpoint(str(where.out / "best" / "weights"), log, monitor=monitor, save_best_only=True,
                                 save_weights_only=True),
        ResumableEarlyStopping(log, monitor=monitor, patience=cfg.train.patience),
        tf.keras.callbacks.CSVLogger(str(where.out / "epochs.csv"), append=True),
        tf.keras.callbacks.BackupAndRestore(str(where.state / "backup")),  # non-chief workers write a temporary copy
        tf.keras.callbacks.TensorBoard(str(where.logdir), histogram_freq=1, write_graph=True),
        StepLog(where.logdir),
    ]


# ---------------------------------------------------------------- after training


def fit_ngram_term(cfg, model, processed, stats, labels):
    """Fit the model's n-gram logistic regression on train (closed form, classes weighted as in training), then
    the weights of the two logit terms on dev; fold them into the model. Returns dev accuracy and macro-F1 of
    each part."""
    t0 = time.time()
    layer = model.get_layer("ngrams")
    sizes = dict(vocab_size=layer.vocab_size, order=layer.order, buckets=layer.buckets)
    seq_len = int(stats["seq_len"])
    train_x, train_y = split_arrays(processed / "train.tfrecord", seq_len)
    table, idf, nbias = ngram.fit_ngram_logits(
        train_x["input_word_ids"], train_x["input_mask"], train_y, len(labels), c=cfg.train.ngram_c,
        class_weight=loss_class_weights(cfg.train, stats, labels), seed=cfg.train.seed, **sizes)

    dev_x, dev_y = split_arrays(processed / "dev.tfrecord", seq_len)
    head = model.get_layer("probabilities")
    pooled = tf.keras.Model(model.inputs, model.get_layer("pooling").output).predict(dev_x, batch_size=32, verbose=0)
    kernel, hbias = head.kernel.numpy(), head.bias.numpy()
    zt = pooled.astype(np.float64) @ kernel + hbias
    zn = ngram.ngram_logits(dev_x["input_word_ids"], dev_x["input_mask"], table, idf, nbias, **sizes)
    beta, alpha = ngram.fit_mix(zt, zn, dev_y)

    layer.table.assign(table * alpha)
    layer.idf.assign(idf)
    layer.bias.assign(nbias * alpha)
    head.kernel.assign(kernel * beta)
    head.bias.assign(hbias * beta)

    def scores(z):
        r = classification_metrics(dev_y, ngram.softmax(z), labels)
        return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}

    parts = {"transformer": scores(zt), "ngrams": scores(zn), "combined": scores(beta * zt + alpha * zn)}
    print("n-gram term: dev accuracy / macro F1 — " + ", ".join(
        f"{k} {v['accuracy']:.4f} / {v['macro_f1']:.4f}" for k, v in parts.items())
        + f" (weights: Transformer {beta:.2f}, n-grams {alpha:.2f}; fitted in {time.time() - t0:.0f} s)")
    return {"transformer_weight": beta, "ngram_weight": alpha, "dev": parts}


def save_model(model_dir, cfg, model, processed, stats, rows):
    """The model in Keras format and as a SavedModel (each lands at its final path only when complete), beside
    its vocabulary, labels, preprocess.json, config.yaml and history.json."""
    with files.atomic_path(model_dir / "model.keras") as tmp:
        model.save(tmp)
    with files.atomic_path(model_dir / "saved_model") as tmp:
        model.save(tmp, save_format="tf")
    for name in ("vocab.txt", "labels.txt"):
        files.write_bytes(model_dir / name, (processed / name).read_bytes())
    files.write_json(model_dir / "preprocess.json", {"seq_len": int(stats["seq_len"])})
    save_config(cfg, model_dir / "config.yaml")
    files.write_json(model_dir / "history.json", rows)


def score(cfg, processed, model_dir, labels):
    """(the split files' texts and labels, dev and test metrics of the saved model): through the same code as
    `pipeline evaluate`, from the raw texts."""
    splits = {s: read_examples(processed / f"{s}.jsonl", cfg.data) for s in ("train", "dev", "test")
              if (processed / f"{s}.jsonl").is_file()}
    predictor = load_predictor(model_dir)
    scores = {s: classification_metrics([labels.index(g) for g in gold], predictor.predict_proba(texts), labels)
              for s, (texts, gold) in splits.items() if s != "train"}
    return splits, scores
