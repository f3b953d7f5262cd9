"""Compression stage: every variant of compress.variants is a recipe, a chain of steps (pipeline/recipes.py)
from the trained model (or the distilled student) to a .tflite file with MediaPipe metadata, e.g.

    prune -> prune_qat -> int8        lowrank -> fine_tune -> int8        prune -> cluster -> cluster_qat -> int8

Each .tflite is evaluated with LiteRT through the same code as `pipeline evaluate`, and with MediaPipe
Tasks as apps run it. A chain prefix shared by several recipes (e.g. prune) is saved once in
compress_state/; every variant and evaluation is written atomically and skipped when a re-run finds it
(compress_state/ remembers the config and model it was made from), so a killed stage resumes.
"""
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from pipeline.core import files
from pipeline.core import manifest
from pipeline.stages.distill import run_distill_stage
from pipeline.core.errors import PipelineError
from pipeline.export.recipes import EXPORT_STEPS, MODEL_STEPS
from pipeline.stages.report import markdown_table

# Bump when what the variants are made of changes, so runs compressed by an older pipeline are rebuilt.
STAGE_VERSION = 3  # 2: fine-tuning weighs rows by class, as training does. 3: the n-gram term counts linearly


def has_student(model_dir):
    """True when the distill stage finished saved_models/<run>/distilled/."""
    return "distilled" in manifest.load(model_dir)["artifacts"]


def distils(cfg):
    """True when compress distils the student itself (a backbone run: its teacher is too big to ship);
    otherwise the variants that start from the student are built only after `make distill`."""
    return cfg.model.backbone != "none"


def variant_names(cfg, model_dir):
    """The variants `make compress` builds for this run: compress.variants, those that start from the
    student only when the run has one or compress distils it."""
    student = has_student(model_dir) or distils(cfg)
    return [n for n, steps in cfg.compress.variants.items() if student or steps[0] != "student"]


def chain_config(cfg, chain):
    """The config a recipe's steps see: a chain that starts from the student (a small model trained from scratch,
    its embedding most of its weights) prunes to compress.student_sparsity at compress.student_learning_rate."""
    if chain[0] != "student":
        return cfg
    c = cfg.compress
    return dataclasses.replace(cfg, compress=dataclasses.replace(c, learning_rate=c.student_learning_rate,
                                                                 sparsity=c.student_sparsity))


PRUNE_RAMP = 0.6  # sparsity reaches its target after this fraction of the pruning steps


# ---------------------------------------------------------------- fine-tuning


def _fine_tune_data(cfg, processed, seq_len, stats, labels):
    """The training batches, each row weighted by its class as in training (train.weigh_by_class)."""
    from pipeline.stages.data import make_dataset
    from pipeline.stages.train import loss_class_weights, weigh_by_class

    t = cfg.train
    data = make_dataset(processed / "train.tfrecord", seq_len, t.batch_size, training=True,
                        bucketing=t.bucketing, seed=t.seed, num_classes=len(labels))
    return weigh_by_class(data, loss_class_weights(t, stats, labels))


def _steps(cfg, train_rows, mean_len, epochs):
    """Whole batches in `epochs` (a float) of the training set; at least one, at most train.step_limit's (when
    > 0; texts of mean_len wordpieces): no fine-tuning step runs longer than training may."""
    from pipeline.stages.train import step_limit

    steps = max(1, round(math.ceil(train_rows / cfg.train.batch_size) * epochs))
    limit = step_limit(cfg.train, mean_len)
    return min(steps, limit) if limit else steps


def _compile(model, cfg, total_steps):
    """AdamW with a short warmup and linear decay to zero, as in training but at the fine-tuning rate."""
    from pipeline.stages.train import WarmupLinearDecay, make_optimizer

    schedule = WarmupLinearDecay(cfg.compress.learning_rate, int(0.1 * total_steps), total_steps)
    model.compile(optimizer=make_optimizer(schedule, cfg.train.weight_decay), loss=tf.keras.losses.CategoricalCrossentropy(),
                  metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy")])


def _fit(model, data, steps, log_dir, callbacks=()):
    """Train for exactly `steps` batches (the dataset repeats): a progress bar on a terminal, else one log line;
    loss, accuracy and learning rate every few dozen steps in TensorBoard (log_dir/steps)."""
    from pipeline.stages.train import StepLog

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


# Quantization points of our layers next to each op that compress.float_ops can keep in float32: QAT
# leaves them without fake-quant, so that the converter does not give those ops int8 ranges.
OP_POINTS = {"BATCH_MATMUL": ("query", "key", "value", "probs"), "SOFTMAX": ("scores", "probs", "logits"),
             "GELU": ("conv_hidden", "ffn_hidden")}


def qat_model(model, cfg, data, steps, log_dir, preserve_sparsity=False, preserve_clusters=False):
    """Quantization-aware fine-tuning of a copy of `model` (float32) for `steps`; with preserve_sparsity
    (preserve_clusters), TFMOT's prune-preserving (cluster-preserving) quantizer keeps zeros (centroids)."""
    from pipeline.model.layers import quantize_model

    float_points = sorted({p for op in cfg.compress.float_ops for p in OP_POINTS.get(op, ())})
    qat = quantize_model(model, preserve_sparsity=preserve_sparsity, float_points=float_points,
                         preserve_clusters=preserve_clusters)
    _compile(qat, cfg, steps)
    _fit(qat, data, steps, log_dir)
    return qat


# ---------------------------------------------------------------- TFLite export


def representative_data(processed, seq_len, n, seed):
    """`n` shuffled training examples padded to seq_len, one per batch: int8 calibration input."""
    from pipeline.stages.data import make_dataset

    ds = make_dataset(processed / "train.tfrecord", seq_len, 1, training=True, bucketing=False, seed=seed)
    samples = [x for x, _ in ds.take(n)]

    def generate():
        for x in samples:
            yield x

    return generate


def export_tflite(model, seq_len, mode, representative=None, float_ops=(), per_tensor=False):
    """TFLite bytes of `model` at batch 1 and a fixed seq_len, in one of the modes of configure_converter;
    int8 with `float_ops`: those op types stay float32 (the converter's quantization debugger denylist)."""
    from pipeline.model.layers import serving_function

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serving_function(model, seq_len)], model)
    configure_converter(converter, mode, representative)
    # One scale per kernel, not per output channel: a clustered kernel then ships its k values, not k per channel.
    converter._experimental_disable_per_channel = per_tensor
    if mode != "int8" or not float_ops:
        return converter.convert()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options)
    return debugger.get_nondebug_quantized_model()


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


def configure_converter(converter, mode, representative=None):
    """Set a TFLite converter up for mode: float32 (no optimization), dynamic_range (int8 weights),
    float16 (float16 weights), int8 (full integer: ranges from the fake-quant ops of a QAT model where
    it has them, from calibration on `representative` elsewhere)."""
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if representative is None:
            raise ValueError("int8 export needs representative data")
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif mode not in ("float32", "dynamic_range"):
        raise ValueError(f"unknown export mode {mode!r}")
    return converter


def tflite_weight_sparsity(content):
    """Fraction of zeros (stored value == zero point) over the weight tensors (constant, 2-D or more,
    >= 1024 values) of a .tflite model: the sparsity that actually ships. The n-gram table is left out:
    it is fitted, not pruned (its unseen rows are zero in every variant)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    zeros = total = 0
    for d in interpreter.get_tensor_details():
        if len(d["shape"]) < 2 or int(np.prod(d["shape"])) < 1024 or "/ngrams/" in d["name"]:
            continue
        try:
            value = interpreter.get_tensor(d["index"])
        except ValueError:  # not a constant: activations have no data before invoke
            continue
        q = d["quantization_parameters"]
        zero = q["zero_points"] if q["zero_points"].size else np.zeros(1, np.int64)
        if zero.size > 1:  # per-channel: one zero point along the quantized dimension
            shape = [1] * value.ndim
            shape[q["quantized_dimension"]] = -1
            zero = zero.reshape(shape)
        zeros += int(np.sum(value == zero))
        total += value.size
    return zeros / total if total else 0.0


def check_parity(keras_probs, tflite_probs, tolerance, path):
    """Raise if the float32 export and the Keras model disagree on any prediction or any
    probability differs by more than `tolerance`; return the largest difference."""
    keras_probs, tflite_probs = np.asarray(keras_probs), np.asarray(tflite_probs)
    if keras_probs.shape != tflite_probs.shape:
        raise PipelineError(f"{path}: parity check failed, outputs of shape {tflite_probs.shape} "
                            f"vs the Keras model's {keras_probs.shape}")
    diff = float(np.max(np.abs(keras_probs - tflite_probs))) if keras_probs.size else 0.0
    disagree = int(np.sum(keras_probs.argmax(1) != tflite_probs.argmax(1)))
    if disagree or diff > tolerance:
        raise PipelineError(f"{path}: parity check failed against the Keras model: {disagree} different "
                            f"predictions, largest probability difference {diff:.2e} (allowed {tolerance:.0e})")
    return diff


# ---------------------------------------------------------------- stage


def stage_key(cfg, model_dir, processed):
    """What the variants depend on: the config, the trained model and the processed data (verified)."""
    from pipeline.stages.train import stage_key as train_key

    key = train_key(cfg, processed, model_dir)
    key["config"]["compress"] = cfg.to_dict()["compress"]
    key["config"].update(manifest.version_config("compress", STAGE_VERSION))
    key["inputs"].update(manifest.inputs(model_dir, manifest.MODEL_FILES, "model"))
    if has_student(model_dir):
        key["inputs"].update(manifest.inputs(model_dir, ["distilled"], "distill"))
    return key


def _table(rows):
    """The compression table as rows of strings, header first."""
    table = [["variant", "accuracy", "Δ acc (pt)", "macro F1", "bytes", "gzip bytes", "sparsity",
              "MediaPipe agreement", "MediaPipe accuracy"]]
    for r in rows:
        mp = r["mediapipe"]
        table.append([r["variant"], f"{r['accuracy']:.4f}", f"{100 * r['accuracy_change']:+.2f}",
                      f"{r['macro_f1']:.4f}", f"{r['bytes']:,}", f"{r['gzip_bytes']:,}", f"{r['sparsity']:.3f}",
                      f"{100 * mp['agreement']:.2f}%", f"{mp['accuracy']:.4f}"])
    return table


# ---------------------------------------------------------------- recipe steps
# A model step is f(model, ctx) -> model (a new one: `model` may be shared with other recipes) and may set
# ctx.stats (written to compress_state/<prefix>.stats.json); an export step is f(model, ctx) -> .tflite bytes.


def _student(model, ctx):
    from pipeline.model.layers import load_model

    return load_model(ctx.model_dir / "distilled" / "model.keras")


def _prune(model, ctx):
    pruned = prune_model(model, ctx.cfg, ctx.data(), ctx.steps(ctx.cfg.compress.prune_epochs), ctx.log_dir)
    ctx.stats = kernel_sparsity(pruned)
    return pruned


def _lowrank(model, ctx):
    from pipeline.model.lowrank import factorise

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


# ---------------------------------------------------------------- stage


def run_compress_stage(cfg, run):
    """`python -m pipeline compress`: every variant in saved_models/<run>/tflite/, evaluated on dev,
    summarized in compression.json; fails if float32.tflite does not match the Keras model."""
    from collections import Counter
    from types import SimpleNamespace

    from pipeline.stages.data import read_examples
    from pipeline.stages.evaluate import KerasPredictor, TFLitePredictor, classification_metrics
    from pipeline.export.metadata import MediaPipeClassifier
    from pipeline.model.layers import load_model
    from pipeline.stages.train import load_processed

    model_dir = Path(cfg.paths.models) / run
    if not (model_dir / "metrics.json").is_file():
        raise PipelineError(f"{model_dir}: no trained model for run '{run}'; run `python -m pipeline train` first")
    processed, stats, labels = load_processed(cfg, run)
    seq_len, train_rows = int(stats["seq_len"]), int(stats["rows"]["train"])
    if distils(cfg) and any(steps[0] == "student" for steps in cfg.compress.variants.values()):
        run_distill_stage(cfg, run)  # skipped when the student is up to date, resumed when it was killed
    key = stage_key(cfg, model_dir, processed)
    if manifest.up_to_date(model_dir, "compress", key):
        return json.loads((model_dir / "compression.json").read_text())
    mean_len = stats["train_encoder_mean_len"]
    manifest.begin(model_dir, "compress")
    state = model_dir / "compress_state"
    names = variant_names(cfg, model_dir)
    recipes = {name: tuple(cfg.compress.variants[name]) for name in names}
    # The list of recipes is not part of the state's key: adding, removing or changing one recipe rebuilds
    # that variant only (shared prefixes are named by their steps, variants remember their recipe).
    state_key = json.loads(json.dumps(key))
    del state_key["config"]["compress"]["variants"]
    tflite_dir = model_dir / "tflite"
    if manifest.work_dir(state, state_key):
        print(f"resuming compression in {state}")

        def forget(name):  # the variant and its evaluation are made again
            for done in (f"{name}.done", f"{name}.eval.done"):
                (state / done).unlink(missing_ok=True)

        for name in names:
            if (state / f"{name}.recipe").is_file() and (state / f"{name}.recipe").read_text() != "+".join(recipes[name]):
                forget(name)
        for path in tflite_dir.glob("*.tflite"):  # variants no longer listed
            if path.stem not in names:
                forget(path.stem)
                path.unlink()
    else:  # no variant from an older model or config survives
        shutil.rmtree(tflite_dir, ignore_errors=True)
        (model_dir / "compression.json").unlink(missing_ok=True)
    tf.keras.mixed_precision.set_global_policy("float32")  # QAT needs float32; exports are float anyway
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()

    texts, gold = read_examples(processed / "dev.jsonl", cfg.data)
    y_true = [labels.index(g) for g in gold]
    keras_probs = KerasPredictor(model_dir).predict_proba(texts)
    reference = classification_metrics(y_true, keras_probs, labels)
    c = cfg.compress

    uses = Counter(steps[:i] for steps in recipes.values() for i in range(1, len(steps)))
    shared = {prefix for prefix, n in uses.items() if n > 1}  # saved once in compress_state/
    total = len(shared) + 2 * len(names)  # shared prefixes, every variant, every evaluation
    numbers = iter(range(1, total + 1))

    def step(name, make):
        """Run `make` unless a previous run finished this step; report its number and time."""
        number = next(numbers)
        done = state / f"{name}.done"
        if done.exists():
            return
        t0 = time.perf_counter()
        tf.keras.utils.set_random_seed(cfg.train.seed)  # each step alone is reproducible after a resume
        make()
        files.write_text(done, f"{time.perf_counter() - t0:.1f}\n")
        print(f"compress [{number}/{total}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)

    def write_variant(name, content):
        """With MediaPipe text-classifier metadata (tokenizer, vocab.txt, labels.txt): a drop-in app model."""
        from pipeline.export.metadata import add_metadata

        description = (f"liteformer {name} Transformer text classifier for {run}; inputs of MediaPipe's BERT "
                       f"classifier at seq_len {seq_len}; outputs probabilities of {', '.join(labels)}.")
        content = add_metadata(content, model_dir / "vocab.txt", model_dir / "labels.txt",
                               f"liteformer-{run}-{name}", description)
        files.write_bytes(tflite_dir / f"{name}.tflite", content)

    tf.keras.utils.set_random_seed(cfg.train.seed)  # the calibration sample, whatever ran before in this process
    ctx = SimpleNamespace(
        cfg=cfg, model_dir=model_dir, seq_len=seq_len, steps=lambda epochs: _steps(cfg, train_rows, mean_len, epochs),
        # a new dataset per step: its shuffle order then depends only on the seed, resumed or not
        data=lambda: _fine_tune_data(cfg, processed, seq_len, stats, labels),
        representative=representative_data(processed, seq_len, c.calibration_samples, cfg.train.seed))
    trained = load_model(model_dir / "model.keras")
    loaded = {}

    def label(prefix):
        return "+".join(prefix)

    def apply(prefix, model):
        """The last step of `prefix` on `model` (the model after the steps before it); writes its stats."""
        tf.keras.utils.set_random_seed(cfg.train.seed)
        ctx.cfg, ctx.history, ctx.stats = chain_config(cfg, prefix), prefix[:-1], None
        ctx.log_dir = Path(cfg.paths.runs) / run / label(prefix)
        out = STEP_FUNCTIONS[prefix[-1]](model, ctx)
        if ctx.stats is not None:
            files.write_json(state / f"{label(prefix)}.stats.json", ctx.stats)
        return out

    def model_after(prefix):
        """The Keras model after `prefix` of a recipe: loaded when shared (made by `ensure`), else computed."""
        if not prefix:
            return trained
        if prefix in shared:
            if prefix not in loaded:
                loaded[prefix] = load_model(state / f"{label(prefix)}.keras")
            return loaded[prefix]
        return apply(prefix, model_after(prefix[:-1]))

    made = set()

    def ensure(prefix):
        """Make the shared `prefix` once (numbered as a step of its own), unless a previous run did."""
        if prefix in made:
            return
        made.add(prefix)

        def make():
            with files.atomic_path(state / f"{label(prefix)}.keras") as tmp:
                apply(prefix, model_after(prefix[:-1])).save(tmp)

        step(label(prefix), make)

    for name, steps in recipes.items():
        *chain, export = steps
        for i in range(1, len(chain) + 1):
            if tuple(chain[:i]) in shared:
                ensure(tuple(chain[:i]))

        def make(chain=tuple(chain), export=export, name=name):
            ctx.recipe = recipes[name]
            write_variant(name, STEP_FUNCTIONS[export](model_after(chain), ctx))
            files.write_text(state / f"{name}.recipe", "+".join(recipes[name]))

        step(name, make)

    rows = []
    for name in names:
        path = tflite_dir / f"{name}.tflite"

        def evaluate(path=path, name=name):
            probs = TFLitePredictor(path).predict_proba(texts)
            if name == "float32":
                diff = check_parity(keras_probs, probs, c.parity_tolerance, path)
                print(f"compress: parity of float32.tflite with the Keras model: {len(texts)} of "
                      f"{len(texts)} dev predictions agree, largest difference {diff:.1e}")
            content = path.read_bytes()
            metrics = classification_metrics(y_true, probs, labels)
            with MediaPipeClassifier(path) as classifier:  # as apps run it: MediaPipe's own tokenizer
                mp_probs = classifier.predict_proba(texts)
            mediapipe = {"agreement": float(np.mean(mp_probs.argmax(1) == probs.argmax(1))),
                         "accuracy": classification_metrics(y_true, mp_probs, labels)["accuracy"],
                         "max_probability_difference": float(np.max(np.abs(mp_probs - probs)))}
            files.write_json(state / f"{name}.eval.json", {
                "variant": name, "path": str(path), "recipe": list(recipes[name]), "bytes": len(content),
                "gzip_bytes": files.gzip_size(content),
                "sparsity": tflite_weight_sparsity(content),
                "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                "accuracy_change": metrics["accuracy"] - reference["accuracy"], "mediapipe": mediapipe,
                "dev": metrics})

        step(f"{name}.eval", evaluate)
        rows.append(json.loads((state / f"{name}.eval.json").read_text()))

    prefixes = sorted({steps[:i] for steps in recipes.values() for i in range(1, len(steps))}, key=len)
    step_stats = {label(p): json.loads((state / f"{label(p)}.stats.json").read_text())
                  for p in prefixes if (state / f"{label(p)}.stats.json").is_file()}
    summary = {
        "run": run, "seq_len": seq_len, "dev_examples": len(texts),
        "keras": {"path": str(model_dir / "model.keras"), "accuracy": reference["accuracy"],
                  "macro_f1": reference["macro_f1"]},
        "pruned_kernel_sparsity": step_stats.get("prune", {}),
        "step_stats": step_stats,  # per recipe prefix: kernel sparsity (prune), [rank, full rank] (lowrank), distinct values (cluster)
        "variants": {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows},
        "seconds": round(sum(float(p.read_text()) for p in state.glob("*.done")), 1),
    }
    table = markdown_table(_table(rows))
    with tf.summary.create_file_writer(str(Path(cfg.paths.runs) / run / "compress")).as_default():
        tf.summary.text("compression", table, step=0)
    files.write_json(model_dir / "compression.json", summary)
    manifest.record(model_dir, "compress", key, [f"tflite/{n}.tflite" for n in names] + ["compression.json"])
    print(f"Keras model: accuracy {reference['accuracy']:.4f}, macro F1 {reference['macro_f1']:.4f}\n{table}")
    print(f"compressed {run} in {time.perf_counter() - started:.0f} s -> {tflite_dir}")
    return summary
