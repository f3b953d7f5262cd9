"""Benchmark stage (`make benchmark`): latency, throughput, load time, peak memory, size and an energy proxy of the
Keras model and of every .tflite variant, each measured in a fresh process (pipeline/measure/latency.py); plus
FLOPs, training throughput with and without length bucketing, LiteRT's per-op placement of every variant, and how
much faster int8 can be than float32 on this CPU for the model's dense layers alone. Writes
saved_models/<run>/benchmark.json."""
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core import files, manifest
from pipeline.core.errors import PipelineError
from pipeline.export.convert import dense_only_files
from pipeline.lm.export import LiteRTLM
from pipeline.lm.generate import generate
from pipeline.lm.measure import score_tflite
from pipeline.lm.tokenizer import load_tokenizer
from pipeline.measure.flops import cpu_peak_flops, forward_flops, matmul_flops
from pipeline.measure.latency import fresh_process
from pipeline.measure.tflite_file import op_placement
from pipeline.measure.training_speed import training_speed
from pipeline.model.build import load_model
from pipeline.text.processed import load_stats, processed_dir
from pipeline.text.read import read_examples
from pipeline.text.tokenizer import encode, make_tokenizer


def run_benchmark_stage(cfg, run):
    """`python -m pipeline benchmark`: measure the Keras model and every .tflite variant of the run and
    write saved_models/<run>/benchmark.json."""
    model_dir = Path(cfg.paths.models) / run
    compression = model_dir / "compression.json"
    if not compression.is_file():
        raise PipelineError(f"{model_dir}: no compression.json; run `python -m pipeline compress` first")
    processed = processed_dir(cfg, run)
    if json.loads(compression.read_text()).get("task") == "lm":
        return run_lm_benchmark_stage(run, model_dir, processed, json.loads(compression.read_text())["variants"])
    variants = json.loads(compression.read_text())["variants"]
    names = list(variants)  # what the compress stage built
    key = stage_key(cfg, model_dir, processed, names)
    if manifest.up_to_date(model_dir, "benchmark", key):
        return json.loads((model_dir / "benchmark.json").read_text())
    manifest.begin(model_dir, "benchmark")
    seq_len = int(json.loads((model_dir / "preprocess.json").read_text())["seq_len"])
    texts, _ = read_examples(processed / "dev.jsonl", cfg.data)
    inputs = encode(make_tokenizer(model_dir / "vocab.txt"), texts[:64], seq_len)
    started = time.perf_counter()
    model = load_model(model_dir / "model.keras")
    result = model_facts(run, model_dir, model, seq_len, variants)
    progress = Progress(len(names) + 4)  # Keras, every variant, the dense layers, training padded and bucketed
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **inputs)
        result["variants"]["keras"] = measure_keras(model_dir, npz, progress)
        for name in names:
            result["variants"][name] = measure_variant(model_dir / "tflite" / f"{name}.tflite", npz, progress)
        result["dense_only"] = measure_dense_layers(model, seq_len, tmp, progress)
    result["training"] = measure_training(cfg, run, model_dir, processed, result["forward_flops_per_example"],
                                          result["cpu"], progress)
    result["ratios"] = ratios(result, names)
    result["seconds"] = round(time.perf_counter() - started, 1)
    files.write_json(model_dir / "benchmark.json", result)
    manifest.record(model_dir, "benchmark", key, ["benchmark.json"])
    print_result(run, model_dir, result, names)
    return result



# ---------------------------------------------------------------- a language-model run (data.task lm)

LM_REPEATS = 3  # generations per variant; the median is reported


def run_lm_benchmark_stage(run, model_dir, processed, variants):
    """Every exported language model at 1 thread through LiteRT: dev bits per character, size, time to first
    token (the prompt's prefill) and decode tokens per second (greedy, after the prompt), in benchmark.json."""
    print("task: lm (the processed run is a language-model run)")
    key = {"config": {"lm_benchmark": {"threads": 1, "repeats": LM_REPEATS}},
           "inputs": {**manifest.inputs(model_dir, [v["file"] for v in variants.values()], "compress"),
                      **manifest.inputs(processed, ["dev.txt"], "processed")}}
    if manifest.up_to_date(model_dir, "benchmark", key):
        return json.loads((model_dir / "benchmark.json").read_text())
    manifest.begin(model_dir, "benchmark")
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    dev = (processed / "dev.txt").read_text(encoding="utf-8")
    rows = {name: lm_variant_speed(model_dir / v["file"], tokenizer, dev) for name, v in variants.items()}
    for name, r in rows.items():
        print(f"{name}: {r['bytes'] / 1e6:.2f} MB, dev {r['dev_bits_per_char']:.4f} bits per char, time to first "
              f"token {r['time_to_first_token_ms']:.1f} ms, decode {r['decode_tokens_per_second']:.0f} tokens/s "
              "(1 thread)")
    files.write_json(model_dir / "benchmark.json", {"run": run, "task": "lm", "threads": 1, "variants": rows})
    manifest.record(model_dir, "benchmark", key, ["benchmark.json"])
    return rows


def lm_variant_speed(path, tokenizer, dev) -> dict:
    """One .tflite language model's dev bits per character, size and generation speed at 1 thread."""
    lm = LiteRTLM(path, threads=1)
    prompt, tokens = dev[:max(1, lm.context // 4)], max(1, lm.context // 2)
    runs = [generate(lm, tokenizer, prompt, max_tokens=tokens, temperature=0) for _ in range(LM_REPEATS)]
    return {"bytes": path.stat().st_size, "dev_bits_per_char": score_tflite(path, tokenizer, dev)["bits_per_char"],
            "prompt_tokens": len(tokenizer.encode(prompt)), "decode_tokens": tokens,
            "time_to_first_token_ms": 1000 * float(np.median([r["prefill_seconds"] for r in runs])),
            "decode_tokens_per_second": float(np.median([r["decode_tokens_per_second"] for r in runs]))}

def stage_key(cfg, model_dir, processed, names):
    """What the measurements depend on: the config (train: the training-speed runs), the model, its variants and
    the processed data."""
    return {"config": {s: cfg.to_dict()[s] for s in ("data", "model", "train")},  # train: the training-speed runs
            "inputs": {**manifest.inputs(model_dir, [*manifest.MODEL_FILES, "history.json", "compression.json",
                                                     *(f"tflite/{n}.tflite" for n in names)], "model"),
                       **manifest.inputs(processed, ("train.tfrecord", "dev.jsonl", "stats.json"), "processed")}}


class Progress:
    """One numbered line per measurement: `benchmark [3/9] int8: ...`."""

    def __init__(self, total):
        self.total, self._numbers = total, iter(range(1, total + 1))

    def __call__(self, what):
        print(f"benchmark [{next(self._numbers)}/{self.total}] {what}", flush=True)


def model_facts(run, model_dir, model, seq_len, variants):
    """benchmark.json's start: the Keras model's parameters and FLOPs, the CPU's peak (and the student's, when
    compress built variants from it)."""
    flops = forward_flops(model, seq_len)
    result = {"run": run, "seq_len": seq_len, "params": int(model.count_params()),
              "forward_flops_per_example": flops, "cpu": cpu_peak_flops(), "variants": {}}
    if any(v["recipe"][0] == "student" for v in variants.values()):  # the student beside its teacher (Keras, above)
        student = load_model(model_dir / "distilled" / "model.keras")
        result["student"] = {"params": int(student.count_params()),
                             "forward_flops_per_example": forward_flops(student, seq_len)}
    return result


def measure_keras(model_dir, npz, progress):
    """The Keras model in a fresh process (tf.function, all cores), with its path and size."""
    keras = fresh_process("keras", model_dir, npz)
    keras.update(path=str(model_dir / "model.keras"), bytes=(model_dir / "model.keras").stat().st_size)
    progress(f"keras: p50 {keras['latency']['threads_all']['p50_ms']:.3f} ms (tf.function, all cores)")
    return keras


def measure_variant(path, npz, progress):
    """A .tflite variant in a fresh process, with its size, gzip size, op placement and matmul FLOPs."""
    content = path.read_bytes()
    measured = fresh_process("tflite", path, npz)
    measured.update(path=str(path), bytes=len(content), gzip_bytes=files.gzip_size(content),
                    ops=op_placement(path), matmul_flops=matmul_flops(path))
    progress(f"{path.stem}: p50 {measured['latency']['threads_1']['p50_ms']:.3f} ms at 1 thread")
    return measured


def measure_dense_layers(model, seq_len, directory, progress):
    """The model's dense layers alone in float32 and full int8, timed interleaved: the most int8 can gain."""
    dense_f32, dense_i8 = fresh_process("pair", *dense_only_files(model, seq_len, directory))
    progress(f"dense layers alone: p50 {dense_f32['p50_ms']:.3f} ms float32, {dense_i8['p50_ms']:.3f} ms int8")
    return {"float32": dense_f32, "int8": dense_i8,
            "note": "the model's dense layers alone (same shapes, residual adds; no attention "
                    "scores, norms, softmax or GELU), float32 vs full int8, 1 thread, interleaved"}


def measure_training(cfg, run, model_dir, processed, flops, peak, progress):
    """The training stage's own speed (from its epoch log) and training speed measured here, padded and bucketed."""
    # Training time from the training stage's epoch log (metrics.json holds results only, so it is
    # identical between two runs of the same config).
    history = json.loads((model_dir / "history.json").read_text())
    train_seconds = max(sum(r.get("epoch_seconds", 0.0) for r in history), 1e-9)
    train_rows = load_stats(processed)["rows"]["train"]
    padded = training_speed(cfg, run, bucketing=False)
    progress(f"training, padded batches: {padded['examples_per_s']:.0f} examples/s")
    bucketed = training_speed(cfg, run, bucketing=True)
    progress(f"training, length bucketing: {bucketed['examples_per_s']:.0f} examples/s")
    train_flops = 3 * flops * padded["examples_per_s"]  # backward ~ 2x forward
    return {
        "stage_seconds": round(train_seconds, 1), "stage_examples_per_s": round(train_rows * len(history) / train_seconds, 1),
        "padded": padded, "bucketed": bucketed, "bucketing_speedup": padded["epoch_seconds"] / bucketed["epoch_seconds"],
        "padded_flops_per_s": train_flops, "padded_fraction_of_peak": train_flops / peak["flops"],
        "flops_note": "3 x forward FLOPs at seq_len per example (backward ~ 2x forward), padded batches",
    }


def ratios(result, names):
    """Each variant's 1-thread p50 over float32's, Keras over float32 (1 and 2 threads), dense int8 over float32."""
    p50 = {name: result["variants"][name]["latency"]["threads_1"]["p50_ms"] for name in names}
    f32, keras = p50["float32"], result["variants"]["keras"]
    dense_f32, dense_i8 = result["dense_only"]["float32"], result["dense_only"]["int8"]
    return {
        **{f"{name}_over_float32_p50_1thread": p50[name] / f32 for name in names if name != "float32"},
        "keras_over_float32_p50": keras["latency"]["threads_all"]["p50_ms"] / f32,
        # Keras runs on all cores (TensorFlow's default thread pools): on a 2-core machine, LiteRT at 2
        # threads is the like-for-like comparison.
        "keras_over_float32_p50_2threads":
            keras["latency"]["threads_all"]["p50_ms"] / result["variants"]["float32"]["latency"]["threads_2"]["p50_ms"],
        "dense_only_int8_over_float32_p50_1thread": dense_i8["p50_ms"] / dense_f32["p50_ms"],
    }


def print_result(run, model_dir, result, names):
    """One line: the slowest variant against float32, float32 against Keras, bucketing's gain."""
    p50 = {name: result["variants"][name]["latency"]["threads_1"]["p50_ms"] for name in names}
    f32, r = p50["float32"], result["ratios"]
    slowest = max((n for n in names if n != "float32"), key=p50.get, default="float32")
    print(f"benchmark {run}: slowest {slowest}/float32 p50 {p50[slowest] / f32:.2f}, float32 "
          f"{r['keras_over_float32_p50']:.1f}x faster than Keras, bucketing {result['training']['bucketing_speedup']:.2f}x "
          f"faster per epoch -> {model_dir / 'benchmark.json'}")
