"""What a .tflite file holds: which ops LiteRT's XNNPACK delegate runs and which fall back to builtin kernels,
and the share of zeros among its weights."""
from collections import Counter

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def op_placement(path):
    """Which ops of a .tflite file LiteRT's default XNNPACK delegate runs, and which fall back to the
    builtin kernels (each fallback splits the graph into another delegate partition)."""
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


def tflite_weight_sparsity(content):
    """Fraction of zeros (stored value == zero point) over the weight tensors (constant, 2-D or more,
    >= 1024 values) of a .tflite model: the sparsity that actually ships. The n-gram table is left out:
    it is fitted, not pruned (its unseen rows are zero in every variant)."""
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
