"""Compression stage (`make compress`): every variant of compress.variants is a recipe, a chain of steps
(pipeline/export/recipes.py) from the trained model (or the distilled student) to a .tflite file with MediaPipe
metadata in saved_models/<run>/tflite/, summarised in compression.json.

Each .tflite is evaluated with LiteRT through the same code as `pipeline evaluate`, and with MediaPipe
Tasks as apps run it. A chain prefix shared by several recipes (e.g. prune) is saved once in
compress_state/; every variant and evaluation is written atomically and skipped when a re-run finds it
(compress_state/ remembers the config and model it was made from), so a killed stage resumes.
"""
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf

from pipeline.core import files, manifest
from pipeline.core.config import LM_COMPRESS_KEYS
from pipeline.core.errors import PipelineError
from pipeline.export.convert import representative_data
from pipeline.export.metadata import add_metadata
from pipeline.export.parity import check_parity
from pipeline.export.recipes import Chains, Steps, fine_tune_data, fine_tune_steps, label, shared_prefixes
from pipeline.export.student import make_student, teacher_labels
from pipeline.lm import compress as lm_compress
from pipeline.lm import export as lm_export
from pipeline.lm.measure import score_tflite
from pipeline.lm.model import load_lm
from pipeline.lm.tokenizer import load_tokenizer
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.predictors import KerasPredictor, MediaPipeClassifier, TFLitePredictor
from pipeline.measure.tables import markdown_table
from pipeline.measure.tflite_file import tflite_weight_sparsity
from pipeline.model.build import load_model
from pipeline.model.distillation import soft_label_dataset
from pipeline.model.training import train_key
from pipeline.text.processed import load_processed, load_stats, processed_dir
from pipeline.text.read import read_examples

# Bump when what the variants are made of changes, so runs compressed by an older pipeline are rebuilt.
STAGE_VERSION = 4  # 2: fine-tuning weighs rows by class, as training does. 3: the n-gram term counts linearly.
# 4: the student's recipes fine-tune on the teacher's soft labels


def run_compress_stage(cfg, run):
    """`python -m pipeline compress`: every variant in saved_models/<run>/tflite/, evaluated on dev,
    summarized in compression.json; fails if float32.tflite does not match the Keras model."""
    model_dir = Path(cfg.paths.models) / run
    if not (model_dir / "metrics.json").is_file():
        raise PipelineError(f"{model_dir}: no trained model for run '{run}'; run `python -m pipeline train` first")
    if load_stats(processed_dir(cfg, run)).get("task") == "lm":
        return run_lm_compress_stage(cfg, run, model_dir, processed_dir(cfg, run))
    processed, stats, labels = load_processed(cfg, run)
    if distils(cfg) and any(steps[0] == "student" for steps in cfg.compress.variants.values()):
        make_student(cfg, run)  # skipped when the student is up to date, resumed when it was killed
    key = stage_key(cfg, model_dir, processed)
    if manifest.up_to_date(model_dir, "compress", key):
        return json.loads((model_dir / "compression.json").read_text())
    manifest.begin(model_dir, "compress")
    recipes = {name: tuple(cfg.compress.variants[name]) for name in variant_names(cfg, model_dir)}
    state = open_state(model_dir, key, recipes)
    tf.keras.mixed_precision.set_global_policy("float32")  # QAT needs float32; exports are float anyway
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()
    dev = dev_reference(cfg, processed, model_dir, labels)
    shared = shared_prefixes(recipes)
    progress = Steps(state, len(shared) + 2 * len(recipes), cfg.train.seed)  # shared prefixes, variants, evaluations
    ctx = recipe_context(cfg, model_dir, processed, stats, labels)
    chains = Chains(cfg, run, load_model(model_dir / "model.keras"), ctx, progress, shared)
    for name, recipe in recipes.items():
        chains.build(name, recipe, lambda name, content: write_variant(model_dir, run, name, content, stats, labels))
    rows = evaluate_variants(progress, model_dir, recipes, dev, state, cfg.compress.parity_tolerance)
    summary = summarise(run, model_dir, stats, dev, recipes, rows, state)
    table = markdown_table(_table(rows))
    with tf.summary.create_file_writer(str(Path(cfg.paths.runs) / run / "compress")).as_default():
        tf.summary.text("compression", table, step=0)
    files.write_json(model_dir / "compression.json", summary)
    manifest.record(model_dir, "compress", key, [f"tflite/{n}.tflite" for n in recipes] + ["compression.json"])
    print(f"Keras model: accuracy {dev.reference['accuracy']:.4f}, macro F1 {dev.reference['macro_f1']:.4f}\n{table}")
    print(f"compressed {run} in {time.perf_counter() - started:.0f} s -> {model_dir / 'tflite'}")
    return summary


# ---------------------------------------------------------------- a language-model run (data.task lm)

# max |logit difference| from Keras that each export may show (prefill and KV-cache decode): float32 is exact;
# float16 weights move logits by hundredths, int8 weights by tenths, int8 activations by up to ~4 on a 4x128
# model with its n-gram table (a broken export is off by far more); what matters, the dev bits per character,
# is recorded beside it. A fine-tuned variant is held to its own fine-tuned Keras model.
LM_PARITY = {"float32": 1e-3, "float16": 0.5, "dynamic_range": 1.0, "int8": 8.0}
LM_STAGE_VERSION = 2  # 2: lm.variants (float16, TFMOT prune / qat / prune_qat)


def run_lm_compress_stage(cfg, run, model_dir, processed):
    """The language model's lm.variants (pipeline/lm/compress.py, export.py): each recipe's fine-tuned model
    exported, checked against its Keras model and scored on dev through LiteRT, in compression.json. A variant
    finished before an interruption, or by a run with other variants, is kept (compress_state/)."""
    print("task: lm (the processed run is a language-model run)")
    section = cfg.to_dict(lm=True)["lm"]
    key = {"config": {"lm_compress": {"parity": LM_PARITY, **{k: section[k] for k in LM_COMPRESS_KEYS}},
                      **manifest.version_config("compress", LM_STAGE_VERSION)},
           "inputs": {**manifest.inputs(model_dir, ["model.keras", "tokenizer.json"], "train"),
                      **manifest.inputs(processed, ["train.txt", "dev.txt"], "processed")}}
    if manifest.up_to_date(model_dir, "compress", key):
        return json.loads((model_dir / "compression.json").read_text())
    manifest.begin(model_dir, "compress")
    state = model_dir / "compress_state"
    # the list of variants is not part of the state's key: adding a recipe builds that one only
    state_key = json.loads(json.dumps(key))
    del state_key["config"]["lm_compress"]["variants"]
    if manifest.work_dir(state, state_key):
        print(f"resuming compression in {state}")
    tf.keras.mixed_precision.set_global_policy("float32")  # QAT needs float32; exports are float anyway
    model, tokenizer = load_lm(model_dir / "model.keras"), load_tokenizer(model_dir / "tokenizer.json")
    train_tokens = tokenizer.encode((processed / "train.txt").read_text(encoding="utf-8"))
    dev = (processed / "dev.txt").read_text(encoding="utf-8")
    reference = json.loads((model_dir / "metrics.json").read_text())["dev"]
    lm = cfg.lm
    chains = lm_compress.Chains(model, lm_compress.Tuning(
        tokens=train_tokens, context=model.get_layer("embedding").max_len, batch_size=lm.batch_size,
        learning_rate=lm.tune_learning_rate, sparsity=lm.sparsity, prune_steps=lm.prune_steps,
        qat_steps=lm.qat_steps, seed=lm.seed))
    rows = {}
    for i, (name, recipe) in enumerate(lm.variants.items(), 1):
        done = state / f"{name}.json"
        if not done.is_file() or json.loads(done.read_text())["recipe"] != list(recipe):
            started = time.perf_counter()
            row = lm_variant(model_dir, name, recipe, chains.model_after(recipe[:-1]), train_tokens, dev, cfg,
                             tokenizer)
            row["dev_bits_per_char_vs_keras"] = row["dev"]["bits_per_char"] - reference["bits_per_char"]
            files.write_json(done, row)
            print(f"compress [{i}/{len(lm.variants)}] {name} done in {time.perf_counter() - started:.0f} s: "
                  f"{row['bytes'] / 1e6:.2f} MB ({row['gzip_bytes'] / 1e6:.2f} gzipped), dev "
                  f"{row['dev']['bits_per_char']:.4f} bits per char (Keras {reference['bits_per_char']:.4f}), "
                  f"max logit difference {row['parity_max_logit_diff']:.4f}", flush=True)
        rows[name] = json.loads(done.read_text())
    files.write_json(model_dir / "compression.json", {"run": run, "task": "lm", "keras_dev": reference,
                                                      "variants": rows})
    manifest.record(model_dir, "compress", key, [r["file"] for r in rows.values()] + ["compression.json"])
    print(f"compressed {run} -> {model_dir / 'tflite'}")
    return rows


def lm_variant(model_dir, name, recipe, model, train_tokens, dev, cfg, tokenizer):
    """tflite/<name>.tflite exported from `model` (the recipe's model steps done) by its last step, checked
    against `model`; its row of compression.json."""
    mode, path = recipe[-1], model_dir / "tflite" / f"{name}.tflite"
    with files.atomic_path(path) as tmp:
        tmp.write_bytes(lm_export.export_tflite(model, mode, calibration_tokens=train_tokens, seed=cfg.lm.seed))
    try:
        worst = lm_export.check_parity(model, path, train_tokens, LM_PARITY[mode])
    except ValueError as e:
        raise PipelineError(str(e)) from None
    content = path.read_bytes()
    return {"file": f"tflite/{name}.tflite", "recipe": list(recipe), "bytes": len(content),
            "gzip_bytes": files.gzip_size(content), "sparsity": lm_compress.weight_sparsity(model),
            "ngram_sparsity": lm_compress.weight_sparsity(model, ngram=True),
            "parity_max_logit_diff": worst, "dev": score_tflite(path, tokenizer, dev)}


# ---------------------------------------------------------------- which variants, from what


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


def stage_key(cfg, model_dir, processed):
    """What the variants depend on: the config, the trained model and the processed data (verified)."""
    key = train_key(cfg, processed, model_dir)
    key["config"]["compress"] = cfg.to_dict()["compress"]
    key["config"].update(manifest.version_config("compress", STAGE_VERSION))
    key["inputs"].update(manifest.inputs(model_dir, manifest.MODEL_FILES, "model"))
    if has_student(model_dir):
        key["inputs"].update(manifest.inputs(model_dir, ["distilled"], "distill"))
    return key


def open_state(model_dir, key, recipes):
    """compress_state/, kept for a resume when an interrupted run of the same key left it (minus the variants
    whose recipe changed or that are no longer listed), else emptied with tflite/ and compression.json."""
    state, tflite_dir = model_dir / "compress_state", model_dir / "tflite"
    # The list of recipes is not part of the state's key: adding, removing or changing one recipe rebuilds
    # that variant only (shared prefixes are named by their steps, variants remember their recipe).
    state_key = json.loads(json.dumps(key))
    del state_key["config"]["compress"]["variants"]
    if manifest.work_dir(state, state_key):
        print(f"resuming compression in {state}")

        def forget(name):  # the variant and its evaluation are made again
            for done in (f"{name}.done", f"{name}.eval.done"):
                (state / done).unlink(missing_ok=True)

        for name, recipe in recipes.items():
            if (state / f"{name}.recipe").is_file() and (state / f"{name}.recipe").read_text() != "+".join(recipe):
                forget(name)
        for path in tflite_dir.glob("*.tflite"):  # variants no longer listed
            if path.stem not in recipes:
                forget(path.stem)
                path.unlink()
    else:  # no variant from an older model or config survives
        shutil.rmtree(tflite_dir, ignore_errors=True)
        (model_dir / "compression.json").unlink(missing_ok=True)
    return state


def recipe_context(cfg, model_dir, processed, stats, labels):
    """What a recipe's steps read: the config, the run, fine-tuning steps and data, int8 calibration data. A chain
    that starts from the student fine-tunes on the distillation's transfer set with the teacher's probabilities as
    targets (SST-2, student pruned and QAT-trained: int8 dev accuracy 83.7% against 82.7% on the gold train labels)."""
    seq_len, train_rows, mean_len = int(stats["seq_len"]), int(stats["rows"]["train"]), stats["train_encoder_mean_len"]
    tf.keras.utils.set_random_seed(cfg.train.seed)  # the calibration sample, whatever ran before in this process
    transfer = {}

    def transfer_set():
        if not transfer:
            transfer["ids"], transfer["logits"], *_ = teacher_labels(
                cfg, model_dir, processed, stats, labels, lambda: load_model(model_dir / "model.keras"))
        return transfer["ids"], transfer["logits"]

    def steps(epochs):
        if ctx.chain[:1] != ("student",):
            return fine_tune_steps(cfg, train_rows, mean_len, epochs)
        return max(1, round(math.ceil(len(transfer_set()[0]) / cfg.distill.batch_size) * epochs))

    def data():  # a new dataset per step: its shuffle order then depends only on the seed, resumed or not
        if ctx.chain[:1] != ("student",):
            return fine_tune_data(cfg, processed, seq_len, stats, labels)
        return soft_label_dataset(*transfer_set(), cfg.distill.batch_size, cfg.train.seed)

    ctx = SimpleNamespace(
        cfg=cfg, model_dir=model_dir, seq_len=seq_len, chain=(), steps=steps, data=data,
        representative=representative_data(processed, seq_len, cfg.compress.calibration_samples, cfg.train.seed))
    return ctx


# ---------------------------------------------------------------- variants and their evaluation


def write_variant(model_dir, run, name, content, stats, labels):
    """tflite/<name>.tflite with MediaPipe text-classifier metadata (tokenizer, vocab.txt, labels.txt): a drop-in
    app model."""
    description = (f"liteformer {name} Transformer text classifier for {run}; inputs of MediaPipe's BERT "
                   f"classifier at seq_len {int(stats['seq_len'])}; outputs probabilities of {', '.join(labels)}.")
    content = add_metadata(content, model_dir / "vocab.txt", model_dir / "labels.txt",
                           f"liteformer-{run}-{name}", description)
    files.write_bytes(model_dir / "tflite" / f"{name}.tflite", content)


def dev_reference(cfg, processed, model_dir, labels):
    """The dev texts, their label ids, the Keras model's probabilities and metrics: what each variant is held to."""
    texts, gold = read_examples(processed / "dev.jsonl", cfg.data)
    y_true = [labels.index(g) for g in gold]
    keras_probs = KerasPredictor(model_dir).predict_proba(texts)
    return SimpleNamespace(texts=texts, y_true=y_true, labels=labels, keras_probs=keras_probs,
                           reference=classification_metrics(y_true, keras_probs, labels))


def evaluate_variants(progress, model_dir, recipes, dev, state, tolerance):
    """Each variant's evaluation (a numbered step, done once): the rows of compression.json's variants."""
    rows = []
    for name, recipe in recipes.items():
        path = model_dir / "tflite" / f"{name}.tflite"
        progress.run(f"{name}.eval", lambda path=path, name=name, recipe=recipe:
                     evaluate_variant(path, name, recipe, dev, state, tolerance))
        rows.append(json.loads((state / f"{name}.eval.json").read_text()))
    return rows


def evaluate_variant(path, name, recipe, dev, state, tolerance):
    """<state>/<name>.eval.json: the variant's dev metrics through LiteRT and through MediaPipe, size and sparsity;
    float32 must match the Keras model (check_parity)."""
    texts, y_true, labels = dev.texts, dev.y_true, dev.labels
    probs = TFLitePredictor(path).predict_proba(texts)
    if name == "float32":
        diff = check_parity(dev.keras_probs, probs, tolerance, path)
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
        "variant": name, "path": str(path), "recipe": list(recipe), "bytes": len(content),
        "gzip_bytes": files.gzip_size(content),
        "sparsity": tflite_weight_sparsity(content),
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "accuracy_change": metrics["accuracy"] - dev.reference["accuracy"], "mediapipe": mediapipe,
        "dev": metrics})


def summarise(run, model_dir, stats, dev, recipes, rows, state):
    """compression.json: the Keras model's scores, every variant's evaluation and each recipe prefix's stats."""
    prefixes = sorted({steps[:i] for steps in recipes.values() for i in range(1, len(steps))}, key=len)
    step_stats = {label(p): json.loads((state / f"{label(p)}.stats.json").read_text())
                  for p in prefixes if (state / f"{label(p)}.stats.json").is_file()}
    return {
        "run": run, "seq_len": int(stats["seq_len"]), "dev_examples": len(dev.texts),
        "keras": {"path": str(model_dir / "model.keras"), "accuracy": dev.reference["accuracy"],
                  "macro_f1": dev.reference["macro_f1"]},
        "pruned_kernel_sparsity": step_stats.get("prune", {}),
        "step_stats": step_stats,  # per recipe prefix: kernel sparsity (prune), [rank, full rank] (lowrank), distinct values (cluster)
        "variants": {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows},
        "seconds": round(sum(float(p.read_text()) for p in state.glob("*.done")), 1),
    }


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
