"""train_lm: fit the character tokenizer, train the causal Transformer on sampled windows (AdamW, linear
warmup then linear decay to 0), log loss / perplexity / bits per character to TensorBoard, save the model."""
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import tensorflow as tf

from pipeline.core import files
from pipeline.lm.config import LMConfig
from pipeline.lm.kneser_ney import ngram_rows, table_from_counts
from pipeline.lm.measure import score_keras
from pipeline.lm.model import build_lm, float32_copy
from pipeline.lm.tokenizer import CharTokenizer, save_tokenizer
from pipeline.lm.windows import check_length, training_dataset
from pipeline.model.training import WarmupLinearDecay, current_learning_rate, make_optimizer


class LMLog(tf.keras.callbacks.Callback):
    """Every `every` steps: the mean train loss of those steps (nats per token), its perplexity and bits per
    character, and the learning rate under <logdir>/steps; at each epoch end the dev slice's scores."""

    def __init__(self, logdir, every, tokens_per_char, dev_fn=None):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(Path(logdir) / "steps")) if logdir else None
        self.every, self.tokens_per_char, self.dev_fn = int(every), tokens_per_char, dev_fn
        self.history, self.started = [], time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._last = (0, 0.0)  # (steps done, loss sum) at the last point written; Keras' loss is an epoch mean

    def _write(self, step, values):
        if self.writer:
            with self.writer.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, v, step=step)

    def on_train_batch_end(self, batch, logs=None):
        done, total = batch + 1, float(logs["loss"]) * (batch + 1)
        if done % self.every:
            return
        loss = (total - self._last[1]) / (done - self._last[0])
        self._last = (done, total)
        step = int(self.model.optimizer.iterations.numpy())
        self._write(step, {"loss": loss, "perplexity": math.exp(loss), "learning_rate":
                           current_learning_rate(self.model.optimizer),
                           "bits_per_char": loss / math.log(2) * self.tokens_per_char})

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        row = {"step": step, "seconds": round(time.time() - self.started, 1), "train_loss": float(logs["loss"])}
        if self.dev_fn:
            dev = self.dev_fn(self.model)
            row.update(dev_bits_per_char=dev["bits_per_char"], dev_loss=dev["nats_per_token"])
            self._write(step, {"dev/bits_per_char": dev["bits_per_char"], "dev/loss": dev["nats_per_token"],
                               "dev/perplexity": dev["perplexity"], "dev/accuracy": dev["accuracy"]})
        self.history.append(row)
        print(json.dumps(row), flush=True)


class Checkpointing(tf.keras.callbacks.Callback):
    """At each epoch end (every eval_every steps): the model, the optimizer and the history so far in
    <out_dir>/checkpoint/, so that an interrupted train_lm resumes there (resume_point)."""

    def __init__(self, directory, cfg, log):
        super().__init__()
        self.directory, self.cfg, self.log = Path(directory), cfg, log

    def on_epoch_end(self, epoch, logs=None):
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=1).save(checkpoint_number=epoch + 1)
        files.write_json(self.directory / "progress.json", {"config": dataclasses.asdict(self.cfg),
                                                            "epochs": epoch + 1, "history": self.log.history})


def resume_point(directory, cfg, model):
    """(epochs done, history) of a checkpoint an interrupted run of the same config left in `directory`, its
    weights and optimizer state restored into `model`; (0, []) when there is none (a stale one is removed)."""
    directory = Path(directory)
    progress = directory / "progress.json"
    latest = tf.train.latest_checkpoint(str(directory))
    if latest and progress.is_file():
        saved = json.loads(progress.read_text())
        if saved["config"] == dataclasses.asdict(cfg):
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(latest).expect_partial()
            return saved["epochs"], saved["history"]
    shutil.rmtree(directory, ignore_errors=True)
    return 0, []


def train_lm(cfg: LMConfig, train_text: str, dev_text: str, out_dir, log_dir=None, name="train.txt"):
    """Train on train_text, score dev_text; writes model.keras (float32 weights), tokenizer.json, config.json,
    history.json, metrics.json to out_dir and returns (float32 model, tokenizer, metrics). A run interrupted
    after a checkpoint (every eval_every steps, in out_dir/checkpoint/) continues from it when rerun."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(cfg.seed)
    tokenizer = CharTokenizer.fit(train_text)
    tokens = tokenizer.encode(train_text)
    check_length(tokens, cfg.context, name)
    data = training_dataset(tokens, cfg.context, cfg.batch_size, seed=cfg.seed, name=name)
    if cfg.ngram_order:  # the table's rows per context length, from the train text's contexts
        cfg = dataclasses.replace(cfg, ngram_rows=ngram_rows(tokens, tokenizer.vocab_size, cfg.ngram_order,
                                                             cfg.ngram_buckets))
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.mixed_precision)
    try:
        model = build_lm(cfg, tokenizer.vocab_size)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    if cfg.ngram_order and cfg.ngram_init == "counts":
        table_from_counts(model.get_layer("ngram_logits"), tokens)
        # The Transformer starts nearly silent (its logits x 0.1), so it adds to the counts, not noise.
        model.get_layer("final_norm").gamma.assign(tf.fill([cfg.d_model], 0.1))
    elif cfg.ngram_order and cfg.ngram_init != "zeros":
        raise ValueError(f"ngram_init must be 'counts' or 'zeros', got {cfg.ngram_init!r}")
    schedule = WarmupLinearDecay(cfg.learning_rate, cfg.warmup_steps, cfg.steps)
    optimizer = make_optimizer(schedule, cfg.weight_decay)
    # make_optimizer's exclusions again (a second call replaces them), plus the n-gram table: decay would
    # pull the counts' log-probabilities towards 0
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "norm", "table"])
    model.compile(optimizer,
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dev_slice = dev_text[:cfg.eval_chars]
    log = LMLog(log_dir, cfg.log_every, len(tokens) / len(train_text),
                lambda m: score_keras(m, tokenizer, dev_slice, cfg.context) if dev_slice else None)
    every, checkpoints = min(cfg.eval_every, cfg.steps), out_dir / "checkpoint"
    done, log.history = resume_point(checkpoints, cfg, model)
    if done:
        print(f"resuming from the checkpoint at step {done * every} in {checkpoints}", flush=True)
    started = time.time() - (log.history[-1]["seconds"] if log.history else 0.0)
    log.started = started
    # the same window stream as an uninterrupted run: the batches already trained on are skipped
    model.fit(data.skip(done * every), steps_per_epoch=every, epochs=max(cfg.steps // every, 1), initial_epoch=done,
              verbose=0, callbacks=[log, Checkpointing(checkpoints, cfg, log)])
    seconds = time.time() - started
    model = float32_copy(model, cfg, tokenizer.vocab_size)
    metrics = {"train_seconds": round(seconds, 1), "steps": int(cfg.steps),
               "steps_per_second": round(cfg.steps / seconds, 3), "parameters": int(model.count_params())}
    if dev_text:
        metrics["dev"] = score_keras(model, tokenizer, dev_text, cfg.context)
    model.save(out_dir / "model.keras")
    save_tokenizer(tokenizer, out_dir / "tokenizer.json")
    cfg.save(out_dir / "config.json")
    (out_dir / "history.json").write_text(json.dumps(log.history, indent=1) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing to resume
    return model, tokenizer, metrics
