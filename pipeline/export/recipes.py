"""Compression recipes: the function behind each step a recipe of compress.variants may chain (the steps are
listed in pipeline/core/config.py), e.g.

    prune -> prune_qat -> int8        lowrank -> fine_tune -> int8        prune -> cluster -> cluster_qat -> int8

and Chains, which makes the model after each prefix of the recipes once, keeping a prefix that several recipes
share in the compress stage's state directory, so that a killed stage redoes only its unfinished steps. A new
technique is one step function here, in STEP_FUNCTIONS, and one entry in config.py's MODEL_STEPS."""
import dataclasses
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from pipeline.core import files
from pipeline.core.config import EXPORT_STEPS, MODEL_STEPS
from pipeline.export.convert import export_tflite
from pipeline.model.build import load_model
from pipeline.model.lowrank import factorise
from pipeline.model.quantize import quantize_model
from pipeline.model.training import (StepLog, WarmupLinearDecay, loss_class_weights, make_optimizer, step_limit,
                                     weigh_by_class)
from pipeline.text.dataset import make_dataset

PRUNE_RAMP = 0.6  # sparsity reaches its target after this fraction of the pruning steps

# Quantization points of our layers next to each op that compress.float_ops can keep in float32: QAT
# leaves them without fake-quant, so that the converter does not give those ops int8 ranges.
OP_POINTS = {"BATCH_MATMUL": ("query", "key", "value", "probs"), "SOFTMAX": ("scores", "probs", "logits"),
             "GELU": ("conv_hidden", "ffn_hidden")}


def chain_config(cfg, chain):
    """The config a recipe's steps see: a chain that starts from the student (a small model trained from scratch,
    its embedding most of its weights) prunes to compress.student_sparsity at compress.student_learning_rate."""
    if chain[0] != "student":
        return cfg
    c = cfg.compress
    return dataclasses.replace(cfg, compress=dataclasses.replace(c, learning_rate=c.student_learning_rate,
                                                                 sparsity=c.student_sparsity))


# ---------------------------------------------------------------- fine-tuning


def fine_tune_data(cfg, processed, seq_len, stats, labels):
    """The training batches, each row weighted by its class as in training (train.weigh_by_class)."""
    t = cfg.train
    data = make_dataset(processed / "train.tfrecord", seq_len, t.batch_size, training=True,
                        bucketing=t.bucketing, seed=t.seed, num_classes=len(labels))
    return weigh_by_class(data, loss_class_weights(t, stats, labels))


def fine_tune_steps(cfg, train_rows, mean_len, epochs):
    """Whole batches in `epochs` (a float) of the training set; at least one, at most train.step_limit's (when
    > 0; texts of mean_len wordpieces): no fine-tuning step runs longer than training may."""
    steps = max(1, round(math.ceil(train_rows / cfg.train.batch_size) * epochs))
    limit = step_limit(cfg.train, mean_len)
    return min(steps, limit) if limit else steps


def _compile(model, cfg, total_steps):
    """AdamW with a short warmup and linear decay to zero, as in training but at the fine-tuning rate."""
    schedule = WarmupLinearDecay(cfg.compress.learning_rate, int(0.1 * total_steps), total_steps)
    model.compile(optimizer=make_optimizer(schedule, cfg.train.weight_decay), loss=tf.keras.losses.CategoricalCrossentropy(),
                  metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy")])


def _fit(model, data, steps, log_dir, callbacks=()):
    """Train for exactly `steps` batches (the dataset repeats): a progress bar on a terminal, else one log line;
    loss, accuracy and learning rate every few dozen steps in TensorBoard (log_dir/steps)."""
    model.fit(data.repeat(), steps_per_epoch=steps, epochs=1, callbacks=[*callbacks, StepLog(log_dir)],
              verbose=1 if sys.stdout.isatty() else 2)


def clone(model):
    """An independent copy of `model` with the same weights (TFMOT wrappers change the layers they wrap)."""
    copy = tf.keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def prune_model(model, cfg, data, steps, log_dir):
    """Magnitude-prune every prunable kernel (embedding, attention, FFN) of a copy of `model` to
    cfg.compress.sparsity while fine-tuning for `steps`; return it with the pruning wrappers stripped."""
    c = cfg.compress
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=c.sparsity, begin_step=0,
        end_step=max(1, int(PRUNE_RAMP * steps)), frequency=max(1, min(c.pruning_frequency, steps // 4)))
    pruned = tfmot.sparsity.keras.prune_low_magnitude(clone(model), pruning_schedule=schedule)
    _compile(pruned, cfg, steps)
    _fit(pruned, data, steps, log_dir, [tfmot.sparsity.keras.UpdatePruningStep(),
                               tfmot.sparsity.keras.PruningSummaries(log_dir=str(log_dir))])
    return tfmot.sparsity.keras.strip_pruning(pruned)


def per_kernel(model, statistic):
    """{"layer/weight": statistic(values)} for every prunable kernel of `model`."""
    return {f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}": statistic(w.numpy())
            for layer in model.layers if isinstance(layer, tfmot.sparsity.keras.PrunableLayer)
            for w in layer.get_prunable_weights()}


def kernel_sparsity(model):
    """{"layer/weight": fraction of exact zeros} for every prunable kernel of `model`."""
    return per_kernel(model, lambda w: float(np.mean(w == 0)))


def qat_model(model, cfg, data, steps, log_dir, preserve_sparsity=False, preserve_clusters=False):
    """Quantization-aware fine-tuning of a copy of `model` (float32) for `steps`; with preserve_sparsity
    (preserve_clusters), TFMOT's prune-preserving (cluster-preserving) quantizer keeps zeros (centroids)."""
    float_points = sorted({p for op in cfg.compress.float_ops for p in OP_POINTS.get(op, ())})
    qat = quantize_model(model, preserve_sparsity=preserve_sparsity, float_points=float_points,
                         preserve_clusters=preserve_clusters)
    _compile(qat, cfg, steps)
    _fit(qat, data, steps, log_dir)
    return qat


def cluster_model(model, cfg, data, steps, log_dir):
    """k-means++ clustering of every prunable kernel of a copy of `model` into cfg.compress.clusters
    centroids while fine-tuning for `steps`; zeros stay zero in a pruned model. Wrappers stripped."""
    c = tfmot.clustering.keras
    sparse = any(v > 0.5 for v in kernel_sparsity(model).values())

    def wrap(layer):
        if isinstance(layer, tfmot.sparsity.keras.PrunableLayer) and layer.get_prunable_weights():
            return c.cluster_weights(layer, number_of_clusters=cfg.compress.clusters, preserve_sparsity=sparse,
                                     cluster_centroids_init=c.CentroidInitialization.KMEANS_PLUS_PLUS)
        return layer

    copy = clone(model)
    with c.cluster_scope():
        clustered = tf.keras.models.clone_model(copy, clone_function=wrap)
    _compile(clustered, cfg, steps)
    _fit(clustered, data, steps, log_dir, [tf.keras.callbacks.TensorBoard(log_dir=str(log_dir))])
    return c.strip_clustering(clustered)


def unique_values(model):
    """{"layer/weight": distinct values} of every prunable kernel of `model` (the clusters that ship)."""
    return per_kernel(model, lambda w: int(np.unique(w).size))


# ---------------------------------------------------------------- recipe steps
# A model step is f(model, ctx) -> model (a new one: `model` may be shared with other recipes) and may set
# ctx.stats (written to compress_state/<prefix>.stats.json); an export step is f(model, ctx) -> .tflite bytes.


def _student(model, ctx):
    return load_model(ctx.model_dir / "distilled" / "model.keras")


def _prune(model, ctx):
    pruned = prune_model(model, ctx.cfg, ctx.data(), ctx.steps(ctx.cfg.compress.prune_epochs), ctx.log_dir)
    ctx.stats = kernel_sparsity(pruned)
    return pruned


def _lowrank(model, ctx):
    factorised, ctx.stats = factorise(model, ctx.cfg.compress.lowrank_energy, ctx.cfg.compress.lowrank_rank)
    return factorised


def _cluster(model, ctx):
    clustered = cluster_model(model, ctx.cfg, ctx.data(), ctx.steps(ctx.cfg.compress.cluster_epochs), ctx.log_dir)
    ctx.stats = unique_values(clustered)
    return clustered


def _fine_tune(model, ctx):
    tuned, steps = clone(model), ctx.steps(ctx.cfg.compress.fine_tune_epochs)
    _compile(tuned, ctx.cfg, steps)
    _fit(tuned, ctx.data(), steps, ctx.log_dir)
    return tuned


def _qat(model, ctx, **preserve):
    return qat_model(model, ctx.cfg, ctx.data(), ctx.steps(ctx.cfg.compress.qat_epochs), ctx.log_dir, **preserve)


def _export(mode):
    def export(model, ctx):
        return export_tflite(model, ctx.seq_len, mode, ctx.representative, ctx.cfg.compress.float_ops,
                             per_tensor="cluster" in ctx.recipe)

    return export


STEP_FUNCTIONS = {
    "student": _student, "prune": _prune, "lowrank": _lowrank, "cluster": _cluster, "fine_tune": _fine_tune,
    "qat": _qat, "prune_qat": lambda m, ctx: _qat(m, ctx, preserve_sparsity=True),
    "cluster_qat": lambda m, ctx: _qat(m, ctx, preserve_clusters=True, preserve_sparsity="prune" in ctx.history),
    **{mode: _export(mode) for mode in EXPORT_STEPS},
}
assert set(STEP_FUNCTIONS) == set(MODEL_STEPS) | set(EXPORT_STEPS)


# ---------------------------------------------------------------- making the recipes' models


class Steps:
    """Numbered steps that a killed run resumes: a step whose marker <state>/<name>.done exists is skipped."""

    def __init__(self, state, total, seed):
        self.state, self.total, self.seed = Path(state), total, seed
        self._numbers = iter(range(1, total + 1))

    def run(self, name, make):
        """Run `make` unless a previous run finished this step; report its number and time."""
        number = next(self._numbers)
        done = self.state / f"{name}.done"
        if done.exists():
            return
        t0 = time.perf_counter()
        tf.keras.utils.set_random_seed(self.seed)  # each step alone is reproducible after a resume
        make()
        files.write_text(done, f"{time.perf_counter() - t0:.1f}\n")
        print(f"compress [{number}/{self.total}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)


def shared_prefixes(recipes):
    """The chain prefixes that more than one recipe starts with: each is made once and kept as a model."""
    uses = Counter(steps[:i] for steps in recipes.values() for i in range(1, len(steps)))
    return {prefix for prefix, n in uses.items() if n > 1}


def label(prefix):
    """A chain prefix's name in the state directory and in runs/<run>/: its steps joined by "+"."""
    return "+".join(prefix)


class Chains:
    """The Keras model after each prefix of the recipes, starting from `trained`: a shared prefix is made once (a
    numbered step of its own) and loaded from the state directory after that, the others computed when needed."""

    def __init__(self, cfg, run, trained, ctx, steps, shared):
        self.cfg, self.run, self.trained, self.ctx, self.steps, self.shared = cfg, run, trained, ctx, steps, shared
        self.state = steps.state
        self._loaded, self._made = {}, set()

    def apply(self, prefix, model):
        """The last step of `prefix` on `model` (the model after the steps before it); writes its stats."""
        tf.keras.utils.set_random_seed(self.cfg.train.seed)
        ctx = self.ctx
        ctx.cfg, ctx.chain, ctx.history, ctx.stats = chain_config(self.cfg, prefix), prefix, prefix[:-1], None
        ctx.log_dir = Path(self.cfg.paths.runs) / self.run / label(prefix)
        out = STEP_FUNCTIONS[prefix[-1]](model, ctx)
        if ctx.stats is not None:
            files.write_json(self.state / f"{label(prefix)}.stats.json", ctx.stats)
        return out

    def model_after(self, prefix):
        """The Keras model after `prefix` of a recipe: loaded when shared (made by `ensure`), else computed."""
        if not prefix:
            return self.trained
        if prefix in self.shared:
            if prefix not in self._loaded:
                self._loaded[prefix] = load_model(self.state / f"{label(prefix)}.keras")
            return self._loaded[prefix]
        return self.apply(prefix, self.model_after(prefix[:-1]))

    def ensure(self, prefix):
        """Make the shared `prefix` once (numbered as a step of its own), unless a previous run did."""
        if prefix in self._made:
            return
        self._made.add(prefix)

        def make():
            with files.atomic_path(self.state / f"{label(prefix)}.keras") as tmp:
                self.apply(prefix, self.model_after(prefix[:-1])).save(tmp)

        self.steps.run(label(prefix), make)

    def build(self, name, recipe, write):
        """Variant `name` as a numbered step: its recipe's shared prefixes first, then its export, handed to
        write(name, .tflite bytes)."""
        *chain, export = recipe
        for i in range(1, len(chain) + 1):
            if tuple(chain[:i]) in self.shared:
                self.ensure(tuple(chain[:i]))

        def make():
            self.ctx.recipe = recipe
            write(name, STEP_FUNCTIONS[export](self.model_after(tuple(chain)), self.ctx))
            files.write_text(self.state / f"{name}.recipe", "+".join(recipe))

        self.steps.run(name, make)
