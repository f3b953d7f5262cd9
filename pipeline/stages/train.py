"""Training stage: fit the Transformer on a processed run, keep the best epoch, save everything."""
import csv
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline.model import backbone
from pipeline.core import files
from pipeline.core import manifest
from pipeline.text import vectors
from pipeline.core.config import save_config
from pipeline.core.errors import PipelineError

PROCESSED_INPUTS = ("train.tfrecord", "dev.tfrecord", "train.jsonl", "dev.jsonl", "vocab.txt", "labels.txt", "stats.json")
ARTIFACTS = ("model.keras", "saved_model", "vocab.txt", "labels.txt", "preprocess.json", "config.yaml",
             "history.json", "metrics.json", "baseline")


@tf.keras.utils.register_keras_serializable(package="liteformer")
class WarmupLinearDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def __init__(self, peak, warmup_steps, total_steps):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = (step + 1.0) / max(self.warmup_steps, 1)
        decay = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * tf.clip_by_value(tf.minimum(warmup, decay), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def read_epoch_log(path):
    """Rows of the CSVLogger file as dicts of floats, one per epoch (the last write of an epoch wins)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    by_epoch = {int(r["epoch"]): r for r in rows if "epoch" in r}  # an epoch redone after a kill is logged twice
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_in_log(rows, monitor, improves):
    """(best value, its epoch, epochs since) of `monitor` in the epoch log; (None, 0, 0) when empty."""
    best, best_epoch, wait = None, 0, 0
    for row in rows:
        if monitor not in row:
            continue
        if best is None or improves(row[monitor], best):
            best, best_epoch, wait = row[monitor], int(row["epoch"]), 0
        else:
            wait += 1
    return best, best_epoch, wait


# BackupAndRestore restores weights, optimizer and epoch counter after a kill, but not callback state:
# without these two, a resumed run would forget its best epoch, overwrite the best weights with a worse
# epoch, and train for longer than an uninterrupted run. Both rebuild their state from the epoch log.
class ResumableModelCheckpoint(tf.keras.callbacks.ModelCheckpoint):
    def __init__(self, filepath, log_path, **kwargs):
        super().__init__(filepath, **kwargs)
        self.log_path = Path(log_path)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        best, _, _ = best_in_log(read_epoch_log(self.log_path), self.monitor, self.monitor_op)
        if best is not None:
            self.best = best


class ResumableEarlyStopping(tf.keras.callbacks.EarlyStopping):
    def __init__(self, log_path, **kwargs):
        super().__init__(**kwargs)
        self.log_path = Path(log_path)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        best, best_epoch, wait = best_in_log(read_epoch_log(self.log_path), self.monitor, self._is_improvement)
        if best is not None:
            self.best, self.best_epoch, self.wait = best, best_epoch, wait


class SetEpoch(tf.keras.callbacks.Callback):
    """Publish the epoch number to the input pipeline, whose shuffle order is seeded by it."""

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


class StepBudget(tf.keras.callbacks.Callback):
    """Stop training, mid-epoch if need be, once the optimizer has taken `total_steps` steps (step_limit);
    the epoch still ends with its dev evaluation and checkpoint. Counted by the optimizer, so a resumed run
    stops where an uninterrupted one would."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, batch, logs=None):
        steps = int(tf.keras.backend.get_value(self.model.optimizer.iterations))  # a MirroredVariable too
        if steps >= self.total_steps and not self.model.stop_training:
            self.model.stop_training = True
            # Keras' epoch line still shows the whole epoch's step count
            print(f"step limit: stopped after {self.total_steps:,} steps, {batch + 1:,} of this epoch's")


class EpochTimer(tf.keras.callbacks.Callback):
    """Adds `epoch_seconds` to the epoch logs, so the total training time survives a resume."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


LOG_EVERY = 25  # optimizer steps between TensorBoard points of loss, accuracy and learning rate


def current_learning_rate(optimizer):
    """The learning rate of the optimizer's last step (tf-keras evaluates its schedule as it steps)."""
    return float(tf.keras.backend.get_value(optimizer.learning_rate))


class StepLog(tf.keras.callbacks.Callback):
    """TensorBoard points every `every` steps under <logdir>/steps: the mean of each training metric (loss,
    accuracy, ...) over those steps (from Keras' running epoch means, so exact) and the learning rate. An
    epoch-level log of a one-epoch run is one dot; this is a curve that shows where a run went wrong."""

    def __init__(self, logdir, every=LOG_EVERY):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(Path(logdir) / "steps"))
        self.every = int(every)

    def on_epoch_begin(self, epoch, logs=None):
        self._last = (0, {})  # (steps done, metric sums) at the last point written

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        sums = {k: float(v) * done for k, v in (logs or {}).items()}
        if done % self.every:
            return
        last_done, last_sums = self._last
        step = int(tf.keras.backend.get_value(self.model.optimizer.iterations))
        with self.writer.as_default():
            for k, total in sums.items():
                tf.summary.scalar(k, (total - last_sums.get(k, 0.0)) / (done - last_done), step=step)
            tf.summary.scalar("learning_rate", current_learning_rate(self.model.optimizer), step=step)
        self._last = (done, sums)


def make_optimizer(learning_rate, weight_decay):
    """AdamW with decoupled weight decay on matrices only: decaying biases and norms only hurts."""
    optimizer = tf.keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, jit_compile=False)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "norm"])
    return optimizer


def make_strategy(name):
    """TensorFlow's own distributed engine: one device, all local devices, or several workers."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":  # reads TF_CONFIG, as tf.distribute documents
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def load_processed(cfg, run):
    """(directory, stats, labels) of data/processed/<run>, or a PipelineError saying to run the data stage."""
    from pipeline.stages.data import STAGE_VERSION, load_labels

    processed = Path(cfg.paths.data) / "processed" / run
    stats_path = processed / "stats.json"
    if not stats_path.exists():
        raise PipelineError(f"{processed}: no processed data for run '{run}'; run `python -m pipeline data` first")
    made_by = manifest.stage_version(processed, "data")
    if made_by != STAGE_VERSION:
        raise PipelineError(f"{processed}: made by an older data stage (version {made_by}, now {STAGE_VERSION}); run "
                            f"`python -m pipeline data --run {run}` again")
    return processed, json.loads(stats_path.read_text()), load_labels(processed)


def pretrained_encoder(cfg, model_dir):
    """saved_models/<run>/pretrained when train.init is pretrained and `make pretrain` finished it, else None."""
    if cfg.train.init != "pretrained" or "pretrained" not in manifest.load(model_dir)["artifacts"]:
        return None
    return Path(model_dir) / "pretrained"


def stage_key(cfg, processed, model_dir):
    """What a trained model depends on: the config sections that shape training, the processed data
    (each file verified against the data stage's manifest) and the pretrained encoder it starts from."""
    optional = tuple(n for n in ("test.jsonl", vectors.FILE_NAME) if (processed / n).is_file())  # test: scored too
    inputs = manifest.inputs(processed, PROCESSED_INPUTS + optional, "processed")
    if pretrained_encoder(cfg, model_dir):
        inputs.update(manifest.inputs(model_dir, ["pretrained"], "pretrain"))
    directory = backbone.configured_dir(cfg)
    if directory:
        inputs.update({f"backbone {name}": sha for name, sha in backbone.checksums(directory).items()})
    return {"config": {s: cfg.to_dict()[s] for s in ("data", "model", "train")}, "inputs": inputs}


def model_config(cfg, stats):
    """model.*, with the n-gram term off when the train split has more than model.ngram_max_rows rows."""
    from pipeline.model.ngram import term_used

    m = cfg.model
    return m if not m.ngram_order or term_used(m, int(stats["rows"]["train"])) else dataclasses.replace(m, ngram_order=0)


def build_run_model(cfg, stats, vocab_size, num_classes, word_vectors):
    """The run's classifier as `make train` builds it (model_config, the word vectors' sizes, the backbone's
    shape), its layers under the current mixed-precision policy."""
    from pipeline.model.layers import build_model

    return build_model(model_config(cfg, stats), vocab_size, num_classes, int(stats["seq_len"]),
                       **vectors.model_sizes(word_vectors), backbone=backbone_spec(cfg))


def backbone_spec(cfg):
    """The BackboneSpec of model.backbone, or None."""
    directory = backbone.configured_dir(cfg)
    return backbone.read_spec(directory) if directory else None


def initialize_encoder(cfg, model, model_dir):
    """Copy the backbone's or the pretrained encoder's weights into `model` when there is one to use; return
    "backbone <name>", "pretrained" or "scratch"."""
    from pipeline.model.layers import copy_encoder_weights, load_model

    directory = backbone.configured_dir(cfg)
    if directory:
        backbone.load_backbone_weights(model, directory)
        print(f"init: backbone {cfg.model.backbone} ({directory}); model.d_model .. model.dropout unused")
        return f"backbone {cfg.model.backbone}"
    source = pretrained_encoder(cfg, model_dir)
    if source is None:
        why = "train.init is scratch" if cfg.train.init == "scratch" else "no pretrained encoder; `make pretrain` makes one"
        print(f"init: scratch ({why})")
        return "scratch"
    copy_encoder_weights(load_model(source / "model.keras"), model)
    summary = json.loads((source / "summary.json").read_text())
    print(f"init: pretrained encoder from {source} ({summary['epochs']} epochs of masked-language modelling on "
          f"{summary['texts']:,} texts; dev masked-token accuracy {summary['dev_masked_accuracy']:.3f})")
    return "pretrained"


def _log_hparams(cfg, logdir):
    from tensorboard.plugins.hparams import api as hp

    flat = {f"{s}.{k}": v for s, d in cfg.to_dict().items() if s in ("data", "model", "train") for k, v in d.items()}
    with tf.summary.create_file_writer(str(logdir)).as_default():
        hp.hparams(flat)


def build_callbacks(cfg, state, logdir, epoch):
    """Order matters: the timer fills the logs first, and the epoch log is written before the backup,
    so a kill between the two only logs an epoch twice (read_epoch_log keeps the last)."""
    log = state / "epochs.csv"
    monitor = cfg.train.monitor
    return [
        SetEpoch(epoch),
        EpochTimer(),
        tf.keras.callbacks.TerminateOnNaN(),
        ResumableModelCheckpoint(str(state / "best" / "weights"), log, monitor=monitor, save_best_only=True,
                                 save_weights_only=True),
        ResumableEarlyStopping(log, monitor=monitor, patience=cfg.train.patience),
        tf.keras.callbacks.CSVLogger(str(log), append=True),
        tf.keras.callbacks.BackupAndRestore(str(state / "backup")),
        tf.keras.callbacks.TensorBoard(str(logdir), histogram_freq=1, write_graph=True),
        StepLog(logdir),
    ]


def epochs_for(t, steps_per_epoch):
    """train.epochs, or more when that is fewer than train.min_steps optimizer steps: 3 epochs of a few
    thousand rows are ~100 steps, far from converged. Fewer when train.max_steps ends training sooner."""
    epochs = max(t.epochs, math.ceil(t.min_steps / max(1, steps_per_epoch)))
    return min(epochs, math.ceil(t.max_steps / max(1, steps_per_epoch))) if t.max_steps else epochs


def step_limit(t, mean_length):
    """train.max_steps, or fewer when train.max_tokens wordpieces (batch_size texts of mean_length a step) run
    out first: a step's time grows with its texts' length, so long documents would otherwise train for hours."""
    by_tokens = max(1, int(t.max_tokens / (t.batch_size * max(1.0, mean_length)))) if t.max_tokens else 0
    return min((s for s in (t.max_steps, by_tokens) if s), default=0)


def steps_for(t, steps_per_epoch):
    """Optimizer steps of the whole run: epochs_for's epochs, cut at train.max_steps (when > 0)."""
    total = steps_per_epoch * epochs_for(t, steps_per_epoch)
    return min(total, t.max_steps) if t.max_steps else total


def class_weights(counts, labels):
    """{class index: n / (classes * count)}: every class weighs as much in the loss as a balanced set's."""
    n = sum(counts.values())
    return {i: n / (len(labels) * counts[label]) for i, label in enumerate(labels)}


def loss_class_weights(t, stats, labels):
    """class_weights of the train split when train.class_weight is balanced, else None (every row 1)."""
    return class_weights(stats["class_counts"]["train"], labels) if t.class_weight == "balanced" else None


def weigh_by_class(data, weights):
    """(x, one-hot y) batches -> (x, y, each row's class weight); unchanged when weights is None. Training
    and compress's fine-tuning both weigh rows here: fine-tuning unweighted undoes training's weighting."""
    if weights is None:
        return data
    table = tf.constant(list(weights.values()), tf.float32)
    return data.map(lambda x, y: (x, y, tf.gather(table, tf.argmax(y, axis=-1))))


def train_model(cfg, run, key):
    """Fit a model on data/processed/<run>; return (model with the best weights, epoch rows, stats, labels,
    "pretrained" or "scratch").
    key: the stage's manifest key, which an interrupted run must share to be resumed."""
    from pipeline.stages.data import make_dataset
    from pipeline.model.layers import set_word_vectors
    from pipeline.text.tokenizer import load_vocabulary

    processed, stats, labels = load_processed(cfg, run)
    vocab = load_vocabulary(processed / "vocab.txt")
    word_vectors = vectors.load_table(processed)
    seq_len = int(stats["seq_len"])
    t = cfg.train
    tf.keras.utils.set_random_seed(t.seed)
    tf.config.experimental.enable_op_determinism()
    tf.keras.backend.experimental.enable_tf_random_generator()  # dropout from tf.random.Generator states
    tf.keras.mixed_precision.set_global_policy(t.mixed_precision)

    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds = make_dataset(processed / "train.tfrecord", seq_len, t.batch_size, training=True,
                            bucketing=t.bucketing, seed=t.seed, epoch=epoch, num_classes=len(labels))
    dev_ds = make_dataset(processed / "dev.tfrecord", seq_len, t.batch_size, training=False, num_classes=len(labels))
    mean_len = stats["train_encoder_mean_len"]
    t = dataclasses.replace(t, max_steps=step_limit(t, mean_len))
    epochs = epochs_for(t, int(train_ds.cardinality()))
    total_steps = steps_for(t, int(train_ds.cardinality()))
    weights = loss_class_weights(t, stats, labels)
    train_ds = weigh_by_class(train_ds, weights)
    print(f"training {epochs} epochs at most ({total_steps:,} steps; train.epochs {t.epochs}, train.min_steps "
          f"{t.min_steps:,}, step limit {t.max_steps:,}: train.max_steps {cfg.train.max_steps:,}, train.max_tokens "
          f"{cfg.train.max_tokens:,} at {mean_len:.0f} wordpieces a text), early stopping on {t.monitor} after {t.patience}; class weights "
          + (", ".join(f"{l} {w:.2f}" for l, w in zip(labels, weights.values())) if weights else "none"))

    if cfg.model.ngram_order and not model_config(cfg, stats).ngram_order:
        print(f"n-gram term: off (train has {stats['rows']['train']:,} rows, more than model.ngram_max_rows "
              f"{cfg.model.ngram_max_rows:,})")

    def build():
        return build_run_model(cfg, stats, len(vocab), len(labels), word_vectors)

    with make_strategy(t.strategy).scope():
        model = build()
        init = initialize_encoder(cfg, model, Path(cfg.paths.models) / run)
        if word_vectors is not None:  # (a pretrained encoder has them, but MLM's random tokens touched unseen rows)
            set_word_vectors(model, *word_vectors)
        # Keras keeps dropout's generator states out of checkpoints on purpose; listing them on the
        # model puts them into BackupAndRestore's, so a resumed run continues the same random stream.
        model.dropout_generators = [layer._random_generator._generator for layer in model.submodules
                                    if isinstance(layer, tf.keras.layers.Dropout)]
        schedule = WarmupLinearDecay(t.learning_rate, int(t.warmup_fraction * total_steps), total_steps)
        model.compile(
            optimizer=make_optimizer(schedule, t.weight_decay),
            loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing),
            metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy")],
        )

    state = Path(cfg.paths.models) / run / "train_state"
    if manifest.work_dir(state, key, resumable=lambda d: (d / "backup").exists()):
        print(f"resuming the interrupted run in {state}")
    logdir = Path(cfg.paths.runs) / run / "train"
    _log_hparams(cfg, logdir)
    callbacks = build_callbacks(cfg, state, logdir, epoch) + [StepBudget(total_steps)]
    model.fit(train_ds, validation_data=dev_ds, epochs=epochs, callbacks=callbacks,
              verbose=1 if sys.stdout.isatty() else 2)
    rows = read_epoch_log(state / "epochs.csv")
    if not rows or any(not math.isfinite(r.get("loss", math.nan)) for r in rows):
        raise PipelineError(f"{state}: training diverged (loss is NaN); lower train.learning_rate and run again")
    # A TF checkpoint, not .h5: .h5 weights fail to load under MirroredStrategy in tf-keras 2.21.
    model.load_weights(str(state / "best" / "weights")).expect_partial()
    if t.mixed_precision != "float32":
        # Saved as a float32 model (the variables are float32 already): evaluate, compress's QAT (FakeQuant has
        # no bfloat16 kernel) and the float32 export then compute what they load, in float32.
        tf.keras.mixed_precision.set_global_policy("float32")
        trained = model
        model = build()
        model.set_weights(trained.get_weights())
    return model, rows, stats, labels, init


def _split_arrays(path, seq_len):
    """(input dict of int32 [n, seq_len] arrays, labels [n]) of a processed split, in file order."""
    import numpy as np

    from pipeline.stages.data import make_dataset

    batches = list(make_dataset(path, seq_len, 1024, training=False).as_numpy_iterator())
    inputs = {k: np.concatenate([b[0][k] for b in batches]) for k in batches[0][0]}
    return inputs, np.concatenate([b[1] for b in batches])


def fit_ngram_term(cfg, model, processed, stats, labels):
    """Fit the model's n-gram logistic regression on train (closed form, classes weighted as in training), then
    the weights of the two logit terms on dev; fold them into the model. Returns dev accuracy and macro-F1 of
    each part."""
    import numpy as np

    from pipeline.model import ngram
    from pipeline.stages.evaluate import classification_metrics

    t0 = time.time()
    layer = model.get_layer("ngrams")
    sizes = dict(vocab_size=layer.vocab_size, order=layer.order, buckets=layer.buckets)
    seq_len = int(stats["seq_len"])
    train_x, train_y = _split_arrays(processed / "train.tfrecord", seq_len)
    table, idf, nbias = ngram.fit_ngram_logits(
        train_x["input_word_ids"], train_x["input_mask"], train_y, len(labels), c=cfg.train.ngram_c,
        class_weight=loss_class_weights(cfg.train, stats, labels), seed=cfg.train.seed, **sizes)

    dev_x, dev_y = _split_arrays(processed / "dev.tfrecord", seq_len)
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


def run_train_stage(cfg, run):
    """`python -m pipeline train`: train, evaluate on dev, and write saved_models/<run>/."""
    from pipeline.measure.baseline import comparison_table, run_baseline
    from pipeline.stages.data import read_examples
    from pipeline.stages.evaluate import classification_metrics, load_predictor
    from pipeline.model.layers import find_layer

    processed, _, _ = load_processed(cfg, run)
    model_dir = Path(cfg.paths.models) / run
    key = stage_key(cfg, processed, model_dir)
    if manifest.up_to_date(model_dir, "train", key):
        return json.loads((model_dir / "metrics.json").read_text())
    manifest.begin(model_dir, "train")
    model, rows, stats, labels, init = train_model(cfg, run, key)
    mix = fit_ngram_term(cfg, model, processed, stats, labels) if find_layer(model, "ngrams") else None

    # Keras format and SavedModel; each lands at its final path only when complete.
    with files.atomic_path(model_dir / "model.keras") as tmp:
        model.save(tmp)
    with files.atomic_path(model_dir / "saved_model") as tmp:
        model.save(tmp, save_format="tf")
    for name in ("vocab.txt", "labels.txt"):
        files.write_bytes(model_dir / name, (processed / name).read_bytes())
    files.write_json(model_dir / "preprocess.json", {"seq_len": int(stats["seq_len"])})
    save_config(cfg, model_dir / "config.yaml")
    files.write_json(model_dir / "history.json", rows)

    # Dev (and test) metrics through the same code as `pipeline evaluate`, from the raw texts; the
    # bag-of-words baseline fitted on the same train rows, scored by the same code, beside them.
    splits = {s: read_examples(processed / f"{s}.jsonl", cfg.data) for s in ("train", "dev", "test")
              if (processed / f"{s}.jsonl").is_file()}
    predictor = load_predictor(model_dir)
    scores = {s: classification_metrics([labels.index(g) for g in gold], predictor.predict_proba(texts), labels)
              for s, (texts, gold) in splits.items() if s != "train"}
    dev = scores["dev"]
    baseline = run_baseline(splits, model_dir / "baseline", labels)
    print(f"bag-of-words baseline (TF-IDF + logistic regression) fitted in {baseline.pop('fit_seconds'):.0f} s "
          f"-> {baseline.pop('path')}")  # out of metrics.json, which a rerun reproduces byte for byte
    seconds = sum(r.get("epoch_seconds", 0.0) for r in rows)
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
    }
    files.write_json(model_dir / "metrics.json", metrics)
    manifest.record(model_dir, "train", key, ARTIFACTS)
    shutil.rmtree(model_dir / "train_state" / "backup", ignore_errors=True)
    print(f"trained {run}: dev accuracy {dev['accuracy']:.4f}, macro F1 {dev['macro_f1']:.4f}, "
          f"{len(rows)} epochs (best {best + 1}) in {seconds:.0f} s -> {model_dir}")
    print(comparison_table(scores, baseline))
    return metrics
