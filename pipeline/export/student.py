"""The distilled student, saved_models/<run>/distilled/: a model directory like the teacher's, made by `make
distill`, and by `make compress` itself on a backbone run (whose teacher is too big to ship); the training is in
pipeline/model/distillation.py."""
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.core import files, manifest
from pipeline.core.config import save_config
from pipeline.core.errors import PipelineError
from pipeline.measure.flops import forward_flops
from pipeline.measure.metrics import classification_metrics
from pipeline.measure.predictors import load_predictor
from pipeline.model.build import load_model
from pipeline.model.distillation import build_student, labelling_copy, train_student, transfer_set
from pipeline.text import vectors
from pipeline.text.dataset import split_arrays
from pipeline.text.processed import load_processed
from pipeline.text.read import read_examples
from pipeline.text.tokenizer import load_vocabulary

PROCESSED_INPUTS = ("train.tfrecord", "dev.tfrecord", "dev.jsonl", "vocab.txt", "labels.txt", "stats.json")


def distill_key(cfg, processed, model_dir):
    """What the student depends on: the config, the processed data and the teacher (the trained model)."""
    names = PROCESSED_INPUTS + (("unlabeled.tfrecord",) if (processed / "unlabeled.tfrecord").is_file() else ())
    return {"config": {s: cfg.to_dict()[s] for s in ("data", "model", "train", "distill")},
            "inputs": {**manifest.inputs(processed, names, "processed"),
                       **manifest.inputs(model_dir, manifest.MODEL_FILES, "teacher")}}


EPOCH_LOG = "distill_state/epochs.csv"  # the student's epochs so far, in the run directory (the search reads it)
TRANSFER_KEYS = ("augment_copies", "mask_prob", "ngram_prob")  # what of distill.* the transfer set depends on


def transfer_key(cfg, processed, model_dir):
    """What the teacher-labelled transfer set depends on: distill_key without the student's shape and training."""
    key = distill_key(cfg, processed, model_dir)
    key["config"]["distill"] = {k: key["config"]["distill"][k] for k in TRANSFER_KEYS}
    return key


def make_student(cfg, run):
    """saved_models/<run>/distilled/ with metrics.json comparing student and teacher (accuracy, macro F1, parameters,
    FLOPs); skipped when up to date, resumed from the cached teacher labels when a run was killed."""
    model_dir = Path(cfg.paths.models) / run
    check_inputs(cfg, run, model_dir)
    processed, stats, labels = load_processed(cfg, run)
    key = distill_key(cfg, processed, model_dir)
    out = model_dir / "distilled"
    if manifest.up_to_date(model_dir, "distill", key):
        return json.loads((out / "metrics.json").read_text())
    manifest.begin(model_dir, "distill")
    started = time.perf_counter()
    tf.keras.utils.set_random_seed(cfg.train.seed)
    tf.keras.mixed_precision.set_global_policy("float32")
    teacher = load_model(model_dir / "model.keras")
    data = teacher_labels(cfg, model_dir, processed, stats, labels, lambda: teacher)
    student, student_cfg, rows = train(cfg, run, processed, stats, labels, teacher, data)
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        save_student(cfg, tmp, model_dir, student, student_cfg, rows)
        metrics = score_student(cfg, tmp, model_dir, processed, labels, student, teacher, int(stats["seq_len"]))
        metrics.update(transfer_texts=int(len(data[0])), epochs=len(rows),
                       best_epoch=1 + int(np.argmax([r["val_accuracy"] for r in rows])),
                       seconds=round(time.perf_counter() - started, 1))
        files.write_json(tmp / "metrics.json", metrics)
    manifest.record(model_dir, "distill", key, ["distilled"])
    print_result(run, metrics, out)
    return metrics


def check_inputs(cfg, run, model_dir):
    """A PipelineError when the run has no trained teacher or distill.* is out of range."""
    if not (model_dir / "metrics.json").is_file():
        raise PipelineError(f"{model_dir}: no trained model (the teacher) for run '{run}'; run `make train` first")
    d = cfg.distill
    if not (d.temperature > 0 and d.alpha >= 0 and d.vector_weight >= 0 and d.augment_copies >= 0 and d.epochs >= 1
            and d.batch_size >= 1 and 0 <= d.mask_prob < 1 and 0 <= d.ngram_prob <= 1):
        raise PipelineError("distill: temperature must be > 0, alpha >= 0, vector_weight >= 0, augment_copies >= 0, "
                            "epochs >= 1, batch_size >= 1, mask_prob in [0, 1), ngram_prob in [0, 1]; "
                            f"got {dataclasses.asdict(d)}")


def teacher_labels(cfg, model_dir, processed, stats, labels, teacher):
    """The transfer set with the teacher's logits and pooled vectors (transfer_set), computed once per teacher and
    transfer set and kept in <model_dir>/distill_state/: a new student shape reuses it, and compress fine-tunes
    the student's recipes on it. teacher() gives the teacher, called only when the set must be labelled."""
    state = model_dir / "distill_state"
    manifest.work_dir(state, transfer_key(cfg, processed, model_dir))
    cache, vectors_file = state / "transfer.npz", state / "vectors.npy"
    if not (cache.is_file() and vectors_file.is_file()):
        vocab = load_vocabulary(processed / "vocab.txt")
        labeller = labelling_copy(cfg, teacher(), stats, len(vocab), len(labels), vectors.load_table(processed))
        data = transfer_set(cfg, processed, int(stats["seq_len"]), labeller, vocab, len(labels))
        with files.atomic_path(vectors_file, suffix=".npy") as tmp:
            np.save(tmp, data[4])
        with files.atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, ids=data[0], logits=data[1], gold=data[2], has_gold=data[3])
    with np.load(cache) as z:  # the vectors (200 MB for SST-2) memory-mapped: compress's fine-tuning never reads them
        return z["ids"], z["logits"], z["gold"], z["has_gold"], np.load(vectors_file, mmap_mode="r")


def train(cfg, run, processed, stats, labels, teacher, data):
    """(student, its model config, its epoch rows): built by build_student and trained on `data`."""
    d, seq_len = cfg.distill, int(stats["seq_len"])
    vocab = load_vocabulary(processed / "vocab.txt")
    student, student_cfg = build_student(cfg, teacher, len(vocab), len(labels), seq_len, vectors.load_table(processed))
    print(f"distill: student d_model {student_cfg.d_model}, {student_cfg.num_heads} heads, ff {student_cfg.ff_dim}, "
          f"{student_cfg.num_layers} layers ({student.count_params():,} parameters; teacher {teacher.count_params():,}); "
          f"T {d.temperature:g}, alpha {d.alpha:g}, vector weight {d.vector_weight:g}")
    dev_x, dev_y = split_arrays(processed / "dev.tfrecord", seq_len)
    rows = train_student(cfg, student, data, (dev_x["input_word_ids"], dev_y), Path(cfg.paths.runs) / run / "distill",
                         Path(cfg.paths.models) / run / EPOCH_LOG)
    return student, student_cfg, rows


def save_student(cfg, directory, model_dir, student, student_cfg, rows):
    """The student as a model directory like the teacher's: model.keras, its vocabulary, labels, preprocess.json,
    config.yaml and history.json."""
    student.save(directory / "model.keras")
    for name in ("vocab.txt", "labels.txt", "preprocess.json"):
        files.write_bytes(directory / name, (model_dir / name).read_bytes())
    save_config(dataclasses.replace(cfg, model=student_cfg), directory / "config.yaml")
    files.write_json(directory / "history.json", rows)


def score_student(cfg, directory, model_dir, processed, labels, student, teacher, seq_len):
    """The saved student's dev (and test) scores beside the teacher's, and both models' parameters and FLOPs."""
    predictor = load_predictor(directory)
    splits = {s: read_examples(processed / f"{s}.jsonl", cfg.data) for s in ("dev", "test")
              if (processed / f"{s}.jsonl").is_file()}
    scores = {s: classification_metrics([labels.index(g) for g in gold], predictor.predict_proba(texts), labels)
              for s, (texts, gold) in splits.items()}
    teacher_metrics = json.loads((model_dir / "metrics.json").read_text())
    return {**scores,
            "teacher": {s: teacher_metrics[s] for s in scores if s in teacher_metrics},
            "params": int(student.count_params()), "teacher_params": int(teacher.count_params()),
            "flops": forward_flops(student, seq_len), "teacher_flops": forward_flops(teacher, seq_len)}


def print_result(run, metrics, out):
    """The student against its teacher, in two lines."""
    t, s = metrics["teacher"]["dev"], metrics["dev"]
    print(f"distilled {run}: student dev accuracy {s['accuracy']:.4f}, macro F1 {s['macro_f1']:.4f} "
          f"(teacher {t['accuracy']:.4f}, {t['macro_f1']:.4f}); FLOPs {metrics['flops'] / metrics['teacher_flops']:.2f}x "
          f"the teacher's, parameters {metrics['params'] / metrics['teacher_params']:.2f}x -> {out}")
    if "test" in metrics and "test" in metrics["teacher"]:
        print(f"  test accuracy: student {metrics['test']['accuracy']:.4f}, teacher {metrics['teacher']['test']['accuracy']:.4f}")
