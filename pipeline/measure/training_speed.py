"""Training speed on a run's data, with and without length bucketing: what `make benchmark` reports beside the
training stage's own time."""
import math
import time

import numpy as np
import tensorflow as tf

from pipeline.model.build import build_model
from pipeline.model.spec import backbone_spec
from pipeline.model.training import make_optimizer
from pipeline.text import vectors
from pipeline.text.dataset import make_dataset
from pipeline.text.processed import load_processed


def training_speed(cfg, run, bucketing, steps=100, warmup=15, budget_s=120.0):
    """Training step time on the run's data with or without length bucketing (fresh model, the training
    stage's optimizer): mean ms/step over `steps` steps after `warmup`, and the epoch time they imply.
    Slow steps are timed for about budget_s (at least 3, after a warmup cut to budget_s / 4): a backbone on
    1,024-wordpiece texts takes ~14 s a step, and 2 x 115 steps of it kept `make benchmark` busy for an hour."""
    processed, stats, labels = load_processed(cfg, run)
    seq_len, t = int(stats["seq_len"]), cfg.train
    tf.keras.utils.set_random_seed(t.seed)
    data = make_dataset(processed / "train.tfrecord", seq_len, t.batch_size, training=True,
                        bucketing=bucketing, seed=t.seed, num_classes=len(labels))
    model = build_model(cfg.model, int(stats["vocab_size"]), len(labels), seq_len,
                        **vectors.model_sizes(vectors.load_table(processed)), backbone=backbone_spec(cfg))
    model.compile(optimizer=make_optimizer(t.learning_rate, t.weight_decay), loss="categorical_crossentropy")
    warm, timed = [], []

    class Timer(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            seconds = time.perf_counter() - self.t0
            # warmup: the first step (it traces the function) always, then until `warmup` steps or budget_s / 4
            if not warm or not timed and len(warm) < warmup and sum(warm) + seconds < budget_s / 4:
                warm.append(seconds)
                return
            timed.append(seconds)
            if len(timed) >= steps or len(timed) >= 3 and sum(timed) >= budget_s:
                self.model.stop_training = True

    model.fit(data.repeat(), steps_per_epoch=warmup + steps, epochs=1, callbacks=[Timer()], verbose=0)
    step = float(np.mean(timed))
    batches = math.ceil(stats["rows"]["train"] / t.batch_size)
    return {"bucketing": bucketing, "ms_per_step": step * 1000.0, "steps_timed": len(timed),
            "examples_per_s": t.batch_size / step, "epoch_seconds": step * batches,
            "note": f"epoch time = mean of {len(timed)} timed steps x {batches} batches per epoch"}
