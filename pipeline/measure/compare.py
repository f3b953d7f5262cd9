"""The variants of a run side by side: one row each (quality from compression.json, cost from benchmark.json, the
baseline from metrics.json), the Pareto front, and the variant that best meets each goal of report.ship."""


def variant_rows(compression, benchmark, baseline=None):
    """One dict per variant (Keras first) joining accuracy, size and measured cost; then the
    bag-of-words baseline (metrics.json["baseline"], when the train stage fitted one)."""
    rows = []
    keras = benchmark["variants"]["keras"]
    rows.append({"variant": "keras", "accuracy": compression["keras"]["accuracy"],
                 "macro_f1": compression["keras"]["macro_f1"], "bytes": keras["bytes"], "gzip_bytes": None,
                 "sparsity": None, "p50_ms": keras["latency"]["threads_all"]["p50_ms"],
                 "p99_ms": keras["latency"]["threads_all"]["p99_ms"], "p50_2t_ms": None,
                 "peak_rss_kb": keras["peak_rss_kb"], "load_ms": keras["load_ms"],
                 "throughput": keras["throughput_examples_per_s"], "energy": None})
    for name, v in compression["variants"].items():
        b = benchmark["variants"][name]
        one, two = b["latency"]["threads_1"], b["latency"]["threads_2"]
        energy = next((val for key, val in one.items() if key.endswith("_per_1000")), None)
        rows.append({"variant": name, "accuracy": v["accuracy"], "macro_f1": v["macro_f1"], "bytes": v["bytes"],
                     "gzip_bytes": v["gzip_bytes"], "sparsity": v["sparsity"], "p50_ms": one["p50_ms"],
                     "p99_ms": one["p99_ms"], "p50_2t_ms": two["p50_ms"], "peak_rss_kb": b["peak_rss_kb"],
                     "load_ms": b["load_ms"], "throughput": b["throughput_examples_per_s"], "energy": energy})
    if baseline:  # quality and size only: the benchmark stage does not time it
        rows.append({"variant": "baseline", "accuracy": baseline["dev"]["accuracy"],
                     "macro_f1": baseline["dev"]["macro_f1"], "bytes": baseline["bytes"],
                     "gzip_bytes": baseline.get("gzip_bytes"), "sparsity": None, "p50_ms": None, "p99_ms": None,
                     "p50_2t_ms": None, "peak_rss_kb": None, "load_ms": None, "throughput": None, "energy": None})
    return rows


# The goals report.ship can name, each the rule that picks one of the .tflite variants.
GOALS = {
    "smallest": "the smallest gzip size within 1 point of the best .tflite accuracy",
    "fastest": "the lowest p50 latency at 1 thread within 1 point of the best .tflite accuracy",
    "most_accurate": "the highest dev accuracy of the .tflite variants",
}


def recommendations(rows, tolerance=0.01):
    """{goal: row} for each of GOALS among the .tflite rows; ties go to the smaller, then the faster."""
    shipped = [r for r in rows if r["variant"] not in ("keras", "baseline")]
    best = max(r["accuracy"] for r in shipped)
    ok = [r for r in shipped if r["accuracy"] >= best - tolerance]
    return {"smallest": min(ok, key=lambda r: (r["gzip_bytes"], r["p50_ms"])),
            "fastest": min(ok, key=lambda r: (r["p50_ms"], r["gzip_bytes"])),
            "most_accurate": min(shipped, key=lambda r: (-r["accuracy"], r["gzip_bytes"], r["p50_ms"]))}


def pareto_front(points):
    """Indices of (cost, accuracy) points no other point beats on both (lower cost, higher accuracy)."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front
