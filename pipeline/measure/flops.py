"""Floating-point operations: a Keras model's forward pass (TensorFlow's profiler), the matmuls of a .tflite file,
and this CPU's theoretical peak."""
import os
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from tensorflow.python.profiler import model_analyzer, option_builder

from pipeline.model.build import serving_function


def forward_flops(model, seq_len):
    """Floating-point operations of one example at seq_len, counted by TensorFlow's profiler on the
    serving graph (matmuls, elementwise ops; as TF registers them)."""
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(model_analyzer.profile(serving_function(model, seq_len).graph, options=options).total_float_ops)


def matmul_flops(path):
    """FLOPs of one invoke of a .tflite file's FULLY_CONNECTED and BATCH_MATMUL ops (2 per multiply-add),
    from its tensor shapes: what low-rank factorisation cuts, whatever the weights' type."""
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


def cpu_peak_flops():
    """This CPU's theoretical fp32 peak: cores x clock x FLOP/cycle (32 with AVX2+FMA: two 8-wide FMA
    units; 16 with AVX; 8 otherwise), from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
    per_cycle = 32 if {"avx2", "fma"} <= set(flags) else 16 if "avx" in flags else 8
    cores = len(os.sched_getaffinity(0))
    return {"flops": cores * mhz * 1e6 * per_cycle, "cores": cores, "mhz": mhz, "flop_per_cycle": per_cycle}
