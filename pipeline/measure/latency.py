"""Latency, throughput, load time, peak memory and an energy proxy of one model, each measured in a fresh worker
process: `python -m pipeline.measure.latency tflite|keras PATH INPUTS.npz` or `... pair A.tflite B.tflite`
prints one JSON line. A .tflite worker imports only numpy and ai_edge_litert, so its peak memory is that of an
app's runtime."""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.compiled_model import CompiledModel
from ai_edge_litert.hardware_accelerator import HardwareAccelerator
from ai_edge_litert.options import CpuOptions, Options

from pipeline import INPUT_NAMES
from pipeline.core.errors import PipelineError

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
    # TensorFlow only in a Keras worker: importing it here, not above, keeps it out of the .tflite workers
    import tensorflow as tf

    from pipeline.model.build import load_model, serving_function

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


def _worker(argv):
    """A worker's command line: tflite|keras PATH INPUTS.npz, or pair A.tflite B.tflite; print the JSON result."""
    kind, *args = argv
    if kind == "pair":
        print(json.dumps(measure_pair(*args)))
        return
    path, inputs = args
    data = np.load(inputs)
    examples = [{k: data[k][i:i + 1] for k in INPUT_NAMES} for i in range(len(data["input_word_ids"]))]
    result = measure_tflite(path, examples) if kind == "tflite" else measure_keras(path, examples)
    print(json.dumps(result))


# ---------------------------------------------------------------- the stage's side


def fresh_process(kind, path, *args):
    """Run one worker in a new Python process; its JSON result."""
    cmd = [sys.executable, "-m", "pipeline.measure.latency", kind, str(path), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"{path}: benchmark worker failed ({tail[0]})")
    return json.loads(lines[-1])


if __name__ == "__main__":
    _worker(sys.argv[1:])
