"""The variants of a run side by side: one row each (quality from compression.json, cost from benchmark.json, the
baseline from metrics.json), the Pareto front, the variant that best meets each goal of report.ship, and the
Transformer against the bag-of-words baseline in words."""


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


NAME = "bag-of-words baseline"


def verdict(model_scores, baseline_scores, split="dev"):
    """One sentence (lower-case start) comparing the Transformer and the baseline on one split's accuracy and
    macro F1."""
    ma, ba = model_scores["accuracy"], baseline_scores["accuracy"]
    mf, bf = model_scores["macro_f1"], baseline_scores["macro_f1"]
    numbers = (f"accuracy: Transformer {100 * ma:.2f}%, baseline {100 * ba:.2f}%; "
               f"macro F1: Transformer {mf:.4f}, baseline {bf:.4f}")
    if ma < ba or mf < bf:
        return f"the {NAME} is better on {split} ({numbers})"
    verb = "beats" if ma > ba and mf > bf else "matches or beats"
    return f"the Transformer {verb} the {NAME} on {split} ({numbers})"


def comparison_table(model: dict, baseline: dict) -> str:
    """Aligned plain-text table of accuracy and macro F1, Transformer vs baseline, per split; then a verdict per
    split (dev picks the best epoch and can flatter either side: on SST-2 it shares phrases with train)."""
    header = ["split", "model acc %", "baseline acc %", "Δ acc (pt)", "model macro-F1", "baseline macro-F1",
              "Δ macro-F1"]
    rows = [header]
    for split in ("dev", "test"):
        if split in model and split in baseline:
            m, b = model[split], baseline[split]
            rows.append([split, f"{100 * m['accuracy']:.2f}", f"{100 * b['accuracy']:.2f}",
                         f"{100 * (m['accuracy'] - b['accuracy']):+.2f}", f"{m['macro_f1']:.4f}",
                         f"{b['macro_f1']:.4f}", f"{m['macro_f1'] - b['macro_f1']:+.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines += [verdict(model[split], baseline[split], split) for split in ("dev", "test")
              if split in model and split in baseline]
    return "\n".join(lines)
