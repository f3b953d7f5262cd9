"""Benchmark stage: latency, throughput, load time, peak memory, size and an energy proxy of the Keras
model and of every .tflite variant, each measured in a fresh process; plus FLOPs, training throughput
with and without length bucketing, LiteRT's per-op placement of every variant, and how much faster int8
can be than float32 on this CPU for the model's dense layers alone.

Workers run as `python -m pipeline.benchmark tflite|keras PATH INPUTS.npz` or `... pair A.tflite
B.tflite` and print one JSON line. A .tflite worker imports only numpy and ai_edge_litert, so its peak
memory is that of an app's runtime.
"""
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import INPUT_NAMES
from pipeline.text import vectors

WARMUP = 20
RUNS = 300  # timed invokes per setting (at least 200, as the issue asks)
THREADS = (1, 2)
THROUGHPUT_BATCH = 32
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


# ---------------------------------------------------------------- measurements inside a worker


def _rss_kb(field="VmRSS"):
    """Resident memory of this process in KiB: now (VmRSS) or its peak (VmHWM). Not getrusage's
    ru_maxrss: Linux carries that over exec from the parent, the stage process with TensorFlow."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _energy_counter():
    """(value, unit) of the RAPL package energy counter when readable, else CPU seconds of this process."""
    try:
        return int(RAPL.read_text()) / 1e6, "joules"
    except (OSError, ValueError):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, "cpu_seconds"


def _percentiles(seconds):
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": int(ms.size)}


def _time_calls(call, inputs):
    """Warm up, then time RUNS calls, each on the next example; also the energy proxy per 1,000 calls."""
    n = len(inputs)
    for i in range(WARMUP):
        call(inputs[i % n])
    times = []
    energy0, unit = _energy_counter()
    for i in range(RUNS):
        x = inputs[i % n]
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    energy1, _ = _energy_counter()
    return {**_percentiles(times), f"{unit}_per_1000": (energy1 - energy0) * 1000.0 / RUNS}


def _compiled(path, threads):
    """(run, input buffers, input details by name) of a .tflite file's first signature as a LiteRT CompiledModel on
    the CPU, as the official benchmark tool runs it."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options

    options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=threads))
    model = CompiledModel.from_file(str(path), options=options)
    signature = list(model.get_signature_list())[0]
    index = model.get_signature_index(signature)
    in_buffers, out_buffers = model.create_input_buffers(index), model.create_output_buffers(index)
    details = model.get_input_tensor_details(signature)
    return lambda: model.run_by_index(index, in_buffers, out_buffers), in_buffers, details


def measure_tflite(path, examples):
    """Latency at 1 and 2 threads, throughput over THROUGHPUT_BATCH examples, load time and peak memory
    of this process."""
    result = {"rss_before_load_kb": _rss_kb(), "latency": {}}
    for threads in THREADS:
        t0 = time.perf_counter()
        run, in_buffers, details = _compiled(path, threads)
        load_ms = (time.perf_counter() - t0) * 1000.0
        order = [next(k for k in INPUT_NAMES if k in name) for name in details]

        def call(example):
            for buffer, key in zip(in_buffers, order):
                buffer.write(example[key])
            run()

        result["latency"][f"threads_{threads}"] = _time_calls(call, examples)
        if threads == THREADS[0]:
            result["load_ms"] = load_ms
        if threads == THREADS[-1]:
            t0 = time.perf_counter()
            for example in examples[:THROUGHPUT_BATCH]:  # the files have a fixed batch of 1
                call(example)
            result["throughput_examples_per_s"] = THROUGHPUT_BATCH / (time.perf_counter() - t0)
            result["throughput_note"] = f"{THROUGHPUT_BATCH} batch-1 invokes at {threads} threads"
    result["peak_rss_kb"] = _rss_kb("VmHWM")
    return result


def measure_pair(*paths):
    """Latency at 1 thread of .tflite files with one float input each, timed interleaved so that load
    from other processes hits them alike."""
    rng = np.random.default_rng(0)
    runs = []
    for path in paths:
        run, in_buffers, details = _compiled(path, 1)
        (shape,) = [d["shape"] for d in details.values()]
        in_buffers[0].write(rng.normal(size=shape).astype(np.float32))
        runs.append(run)
    times = [[] for _ in runs]
    for i in range(WARMUP + RUNS):
        for run, t in zip(runs, times):
            t0 = time.perf_counter()
            run()
            t.append(time.perf_counter() - t0)
    return [_percentiles(t[WARMUP:]) for t in times]


def measure_keras(model_dir, examples):
    """Latency at batch 1 and throughput at batch 32 through a compiled tf.function, load time, memory."""
    result = {"rss_before_load_kb": _rss_kb()}
    import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS)
    import tensorflow as tf

    from pipeline.model.layers import load_model, serving_function

    seq_len = int(examples[0]["input_word_ids"].shape[-1])
    t0 = time.perf_counter()
    model = load_model(Path(model_dir) / "model.keras")
    one = serving_function(model, seq_len, batch_size=1)
    result["load_ms"] = (time.perf_counter() - t0) * 1000.0
    tensors = [{k: tf.constant(v) for k, v in e.items()} for e in examples]
    result["latency"] = {"threads_all": _time_calls(lambda x: one(x).numpy(), tensors)}
    batch = {k: tf.constant(np.concatenate([e[k] for e in examples[:THROUGHPUT_BATCH]])) for k in INPUT_NAMES}
    many = serving_function(model, seq_len, batch_size=THROUGHPUT_BATCH)
    for _ in range(5):
        many(batch)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        np.asarray(many(batch))
        times.append(time.perf_counter() - t0)
    result["throughput_examples_per_s"] = THROUGHPUT_BATCH / float(np.median(times))
    result["throughput_note"] = f"batch {THROUGHPUT_BATCH}, median of 30 calls"
    result["peak_rss_kb"] = _rss_kb("VmHWM")
    return result


# ---------------------------------------------------------------- measurements in the stage process


def op_placement(path):
    """Which ops of a .tflite file LiteRT's default XNNPACK delegate runs, and which fall back to the
    builtin kernels (each fallback splits the graph into another delegate partition)."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    dtypes = {d["index"]: np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # the graph's nodes, then one DELEGATE node per partition
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    producer = {t: op["index"] for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]}
    delegated = set()
    for part in partitions:  # walk back from a partition's outputs to its inputs
        stop, stack = set(part["inputs"]), list(part["outputs"])
        while stack:
            t = stack.pop()
            if t in stop or t not in producer or producer[t] in delegated:
                continue
            delegated.add(producer[t])
            stack.extend(ops[producer[t]]["inputs"])
    placed, fallback = Counter(), Counter()
    for op in ops:
        if op["op_name"] == "DELEGATE":
            continue
        key = f"{op['op_name']}:{dtypes.get(op['outputs'][0], '?') if len(op['outputs']) else '?'}"  # UNIQUE has two
        (placed if op["index"] in delegated else fallback)[key] += 1
    return {"xnnpack_partitions": len(partitions), "delegated": dict(sorted(placed.items())),
            "builtin_fallback": dict(sorted(fallback.items()))}


def matmul_flops(path):
    """FLOPs of one invoke of a .tflite file's FULLY_CONNECTED and BATCH_MATMUL ops (2 per multiply-add),
    from its tensor shapes: what low-rank factorisation cuts, whatever the weights' type."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    sizes = {d["index"]: (int(np.prod(d["shape"])), [int(n) for n in d["shape"]])
             for d in interpreter.get_tensor_details()}
    total = 0
    for op in interpreter._get_ops_details():
        if op["op_name"] == "FULLY_CONNECTED":  # weights [out, in]
            total += 2 * sizes[op["outputs"][0]][0] * sizes[op["inputs"][1]][1][-1]
        elif op["op_name"] == "BATCH_MATMUL":  # [.., M, K] @ [.., K, N]: K = size(a) * N / size(out)
            (out, shape), a = sizes[op["outputs"][0]], sizes[op["inputs"][0]][0]
            total += 2 * out * (a * shape[-1] // out)
    return total


def dense_only_files(trained, seq_len, directory):
    """float32 and int8 .tflite files of the dense layers of `trained`'s encoder blocks alone: the same shapes
    (the convolution's matmul, four attention projections and the feed-forward pair per block) and residual adds,
    but no attention scores, norms, softmax or GELU. Their int8/float32 latency is the most int8 can gain for
    this model on this CPU."""
    import tensorflow as tf

    from pipeline.stages.compress import configure_converter
    from pipeline.model.layers import EncoderBlock

    blocks = [layer for layer in trained.layers if isinstance(layer, EncoderBlock)]
    d = blocks[0].d_model
    x = inputs = tf.keras.Input(shape=(seq_len, d), batch_size=1)
    for block in blocks:
        if block.conv_width:  # [T, w*d] @ [w*d, d], as the block computes it
            window = tf.keras.layers.Concatenate()([x] * block.conv_width)
            x = tf.keras.layers.Add()([x, tf.keras.layers.Dense(d, activation="relu")(window)])
        h = x
        for _ in range(4):
            h = tf.keras.layers.Dense(d)(h)
        x = tf.keras.layers.Add()([x, h])
        h = tf.keras.layers.Dense(block.ff_dim, activation="relu")(x)
        x = tf.keras.layers.Add()([x, tf.keras.layers.Dense(d)(h)])
    model = tf.keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    representative = lambda: ([rng.normal(size=(1, seq_len, d)).astype(np.float32)] for _ in range(20))  # noqa: E731
    paths = []
    for mode in ("float32", "int8"):
        converter = configure_converter(tf.lite.TFLiteConverter.from_keras_model(model), mode, representative)
        paths.append(Path(directory) / f"dense_only_{mode}.tflite")
        paths[-1].write_bytes(converter.convert())
    return paths


def forward_flops(model, seq_len):
    """Floating-point operations of one example at seq_len, counted by TensorFlow's profiler on the
    serving graph (matmuls, elementwise ops; as TF registers them)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    from pipeline.model.layers import serving_function

    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(model_analyzer.profile(serving_function(model, seq_len).graph, options=options).total_float_ops)


def cpu_peak_flops():
    """This CPU's theoretical fp32 peak: cores x clock x FLOP/cycle (32 with AVX2+FMA: two 8-wide FMA
    units; 16 with AVX; 8 otherwise), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
    per_cycle = 32 if {"avx2", "fma"} <= set(flags) else 16 if "avx" in flags else 8
    cores = len(os.sched_getaffinity(0))
    return {"flops": cores * mhz * 1e6 * per_cycle, "cores": cores, "mhz": mhz, "flop_per_cycle": per_cycle}


def training_speed(cfg, run, bucketing, steps=100, warmup=15, budget_s=120.0):
    """Training step time on the run's data with or without length bucketing (fresh model, the training
    stage's optimizer): mean ms/step over `steps` steps after `warmup`, and the epoch time they imply.
    Slow steps are timed for about budget_s (at least 3, after a warmup cut to budget_s / 4): a backbone on
    1,024-wordpiece texts takes ~14 s a step, and 2 x 115 steps of it kept `make benchmark` busy for an hour."""
    import math

    import tensorflow as tf

    from pipeline.stages.data import make_dataset
    from pipeline.model.layers import build_model
    from pipeline.stages.train import backbone_spec, load_processed, make_optimizer

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


def _fresh_process(kind, path, *args):
    """Run one worker in a new Python process; its JSON result."""
    cmd = [sys.executable, "-m", "pipeline.stages.benchmark", kind, str(path), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        from pipeline.core.errors import PipelineError

        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"{path}: benchmark worker failed ({tail[0]})")
    return json.loads(lines[-1])


def run_benchmark_stage(cfg, run):
    """`python -m pipeline benchmark`: measure the Keras model and every .tflite variant of the run and
    write saved_models/<run>/benchmark.json."""
    import tempfile

    from pipeline.core import files
    from pipeline.core import manifest
    from pipeline.stages.data import load_stats, read_examples
    from pipeline.core.errors import PipelineError
    from pipeline.model.layers import load_model
    from pipeline.text.tokenizer import encode, make_tokenizer

    model_dir = Path(cfg.paths.models) / run
    compression = model_dir / "compression.json"
    if not compression.is_file():
        raise PipelineError(f"{model_dir}: no compression.json; run `python -m pipeline compress` first")
    processed = Path(cfg.paths.data) / "processed" / run
    variants = json.loads(compression.read_text())["variants"]
    names = list(variants)  # what the compress stage built
    key = {"config": {s: cfg.to_dict()[s] for s in ("data", "model", "train")},  # train: the training-speed runs
           "inputs": {**manifest.inputs(model_dir, [*manifest.MODEL_FILES, "history.json", "compression.json",
                                                    *(f"tflite/{n}.tflite" for n in names)], "model"),
                      **manifest.inputs(processed, ("train.tfrecord", "dev.jsonl", "stats.json"), "processed")}}
    if manifest.up_to_date(model_dir, "benchmark", key):
        return json.loads((model_dir / "benchmark.json").read_text())
    manifest.begin(model_dir, "benchmark")
    # Training time from the training stage's epoch log (metrics.json holds results only, so it is
    # identical between two runs of the same config).
    history = json.loads((model_dir / "history.json").read_text())
    train_seconds = max(sum(r.get("epoch_seconds", 0.0) for r in history), 1e-9)
    train_rows = load_stats(processed)["rows"]["train"]
    seq_len = int(json.loads((model_dir / "preprocess.json").read_text())["seq_len"])
    texts, _ = read_examples(processed / "dev.jsonl", cfg.data)
    inputs = encode(make_tokenizer(model_dir / "vocab.txt"), texts[:64], seq_len)
    started = time.perf_counter()

    model = load_model(model_dir / "model.keras")
    flops = forward_flops(model, seq_len)
    peak = cpu_peak_flops()
    result = {"run": run, "seq_len": seq_len, "params": int(model.count_params()),
              "forward_flops_per_example": flops, "cpu": peak, "variants": {}}
    if any(v["recipe"][0] == "student" for v in variants.values()):  # the student beside its teacher (Keras, above)
        student = load_model(model_dir / "distilled" / "model.keras")
        result["student"] = {"params": int(student.count_params()),
                             "forward_flops_per_example": forward_flops(student, seq_len)}
    total = len(names) + 4  # Keras, every variant, the dense layers, training padded and bucketed
    numbers = iter(range(1, total + 1))

    def progress(what):
        print(f"benchmark [{next(numbers)}/{total}] {what}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **inputs)
        keras = _fresh_process("keras", model_dir, npz)
        keras.update(path=str(model_dir / "model.keras"), bytes=(model_dir / "model.keras").stat().st_size)
        result["variants"]["keras"] = keras
        progress(f"keras: p50 {keras['latency']['threads_all']['p50_ms']:.3f} ms (tf.function, all cores)")
        for name in names:
            path = model_dir / "tflite" / f"{name}.tflite"
            content = path.read_bytes()
            measured = _fresh_process("tflite", path, npz)
            measured.update(path=str(path), bytes=len(content),
                            gzip_bytes=len(gzip.compress(content, compresslevel=9, mtime=0)),
                            ops=op_placement(path), matmul_flops=matmul_flops(path))
            result["variants"][name] = measured
            progress(f"{name}: p50 {measured['latency']['threads_1']['p50_ms']:.3f} ms at 1 thread")
        dense_f32, dense_i8 = _fresh_process("pair", *dense_only_files(model, seq_len, tmp))
        progress(f"dense layers alone: p50 {dense_f32['p50_ms']:.3f} ms float32, {dense_i8['p50_ms']:.3f} ms int8")
        result["dense_only"] = {"float32": dense_f32, "int8": dense_i8,
                                "note": "the model's dense layers alone (same shapes, residual adds; no attention "
                                        "scores, norms, softmax or GELU), float32 vs full int8, 1 thread, interleaved"}

    padded = training_speed(cfg, run, bucketing=False)
    progress(f"training, padded batches: {padded['examples_per_s']:.0f} examples/s")
    bucketed = training_speed(cfg, run, bucketing=True)
    progress(f"training, length bucketing: {bucketed['examples_per_s']:.0f} examples/s")
    train_flops = 3 * flops * padded["examples_per_s"]  # backward ~ 2x forward
    result["training"] = {
        "stage_seconds": round(train_seconds, 1), "stage_examples_per_s": round(train_rows * len(history) / train_seconds, 1),
        "padded": padded, "bucketed": bucketed, "bucketing_speedup": padded["epoch_seconds"] / bucketed["epoch_seconds"],
        "padded_flops_per_s": train_flops, "padded_fraction_of_peak": train_flops / peak["flops"],
        "flops_note": "3 x forward FLOPs at seq_len per example (backward ~ 2x forward), padded batches",
    }
    p50 = {name: result["variants"][name]["latency"]["threads_1"]["p50_ms"] for name in names}
    f32 = p50["float32"]
    result["ratios"] = {
        **{f"{name}_over_float32_p50_1thread": p50[name] / f32 for name in names if name != "float32"},
        "keras_over_float32_p50": keras["latency"]["threads_all"]["p50_ms"] / f32,
        # Keras runs on all cores (TensorFlow's default thread pools): on a 2-core machine, LiteRT at 2
        # threads is the like-for-like comparison.
        "keras_over_float32_p50_2threads":
            keras["latency"]["threads_all"]["p50_ms"] / result["variants"]["float32"]["latency"]["threads_2"]["p50_ms"],
        "dense_only_int8_over_float32_p50_1thread": dense_i8["p50_ms"] / dense_f32["p50_ms"],
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    files.write_json(model_dir / "benchmark.json", result)
    manifest.record(model_dir, "benchmark", key, ["benchmark.json"])
    r = result["ratios"]
    slowest = max((n for n in names if n != "float32"), key=p50.get, default="float32")
    print(f"benchmark {run}: slowest {slowest}/float32 p50 {p50[slowest] / f32:.2f}, float32 "
          f"{r['keras_over_float32_p50']:.1f}x faster than Keras, bucketing {result['training']['bucketing_speedup']:.2f}x "
          f"faster per epoch -> {model_dir / 'benchmark.json'}")
    return result


def _worker(argv):
    kind, *args = argv
    if kind == "pair":
        print(json.dumps(measure_pair(*args)))
        return
    path, inputs = args
    data = np.load(inputs)
    examples = [{k: data[k][i:i + 1] for k in INPUT_NAMES} for i in range(len(data["input_word_ids"]))]
    result = measure_tflite(path, examples) if kind == "tflite" else measure_keras(path, examples)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])
