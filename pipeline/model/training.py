"""How the classifier is trained, shared by train, pretrain, distill and compress's fine-tuning: the learning-rate
schedule and optimizer, callbacks that survive a resume, step and epoch budgets, class weights, and what a trained
model depends on (its manifest key)."""
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import tensorflow as tf

from pipeline.core import files, manifest
from pipeline.core.errors import PipelineError
from pipeline.model import backbone
from pipeline.model.build import pretrained_encoder
from pipeline.model.layers import register
from pipeline.text import vectors

# what a trained model is made from: the processed run's files (verified against its manifest)
PROCESSED_INPUTS = ("train.tfrecord", "dev.tfrecord", "train.jsonl", "dev.jsonl", "vocab.txt", "labels.txt", "stats.json")


@register
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


def write_epoch_log(path, rows):
    """Rows (dicts with the same keys) as a CSV file that read_epoch_log reads, written whole and atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, text.getvalue())


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
    """The learning rate of the optimizer's last step (tf-keras evaluates its schedule as it steps; a legacy
    optimizer, such as the DP one, returns the schedule itself)."""
    rate = optimizer.learning_rate
    if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(optimizer.iterations - 1)
    return float(tf.keras.backend.get_value(rate))


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
    """TensorFlow's own distributed engine: one device, all local devices, or several workers (TF_CONFIG). Call it
    before any other TensorFlow op: several workers' collective ops can only be configured at start-up."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def check_tf_config(text):
    """A one-line error for a TF_CONFIG that TensorFlow would fail on with a traceback (or a hang); unset is one
    worker alone."""
    if not text:
        return
    try:
        config = json.loads(text)
        workers = config["cluster"].get("worker", []) + config["cluster"].get("chief", [])
        task_type, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PipelineError(f"TF_CONFIG: not {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, \"task\": "
                            f"{{\"type\": \"worker\", \"index\": i}}}} ({type(e).__name__}: {e})") from None
    if not workers or task_type not in config["cluster"] or not 0 <= index < len(config["cluster"][task_type]):
        raise PipelineError(f"TF_CONFIG: task {task_type} {index} is not in the cluster {config['cluster']}")


def is_chief(strategy):
    """Whether this process writes the run's files: always, except on the non-chief workers of several."""
    return strategy.extended.should_checkpoint


def worker_counts(strategy, *flags):
    """How many workers have each flag true (one all-reduce over all workers, so also a barrier); the flags
    themselves as 0/1 without several workers. Every worker must call it, with the same number of flags."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return [int(bool(f)) for f in flags]
    mine = tf.constant([float(bool(f)) for f in flags])
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: mine), axis=None)
    return [int(round(v / len(strategy.extended.worker_devices))) for v in total.numpy()]  # one per replica


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


def train_key(cfg, processed, model_dir):
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
