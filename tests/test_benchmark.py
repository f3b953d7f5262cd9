"""The report from a fixture run (the benchmark of a real compressed run is tested in test_compress)."""
import json

import numpy as np
import pytest

from pipeline.core import manifest


def fixture_run(tmp_path):
    """A model directory with the stage outputs the report reads, numbers made up but well-formed."""
    d = tmp_path / "saved_models" / "fx"
    d.mkdir(parents=True)
    (d / "labels.txt").write_text("neg\npos\n")
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ngood\n")
    (d / "tflite").mkdir()
    names = ["float32", "int8", "pruned_qat_int8"]
    accuracy = {"float32": 0.90, "int8": 0.895, "pruned_qat_int8": 0.85}
    size = {"float32": 4_000_000, "int8": 1_000_000, "pruned_qat_int8": 1_000_000}
    gz = {"float32": 3_700_000, "int8": 700_000, "pruned_qat_int8": 300_000}
    p50 = {"float32": 0.40, "int8": 0.30, "pruned_qat_int8": 0.31}
    compression = {"keras": {"accuracy": 0.90, "macro_f1": 0.9}, "variants": {
        n: {"accuracy": accuracy[n], "macro_f1": accuracy[n], "bytes": size[n], "gzip_bytes": gz[n],
            "sparsity": 0.8 if "pruned" in n else 0.0, "dev": {"confusion_matrix": [[40, 5], [5, 50]]},
            "path": str(d / "tflite" / f"{n}.tflite"),
            "mediapipe": {"agreement": 1.0, "accuracy": accuracy[n], "max_probability_difference": 0.0}}
        for n in names}}
    for n in names:
        (d / "tflite" / f"{n}.tflite").write_bytes(n.encode())
    lat = lambda p: {"p50_ms": p, "p90_ms": p * 1.1, "p99_ms": p * 1.5, "cpu_seconds_per_1000": p}  # noqa: E731
    variants = {n: {"latency": {"threads_1": lat(p50[n]), "threads_2": lat(p50[n] * 0.8)}, "peak_rss_kb": 60000,
                    "load_ms": 5.0, "throughput_examples_per_s": 2000.0, "bytes": size[n],
                    "ops": {"xnnpack_partitions": 3, "delegated": {"FULLY_CONNECTED:int8": 4},
                            "builtin_fallback": {"SOFTMAX:int8": 2}}} for n in names}
    variants["keras"] = {"latency": {"threads_all": lat(4.0)}, "peak_rss_kb": 600000, "load_ms": 900.0,
                         "throughput_examples_per_s": 500.0, "bytes": 5_000_000}
    benchmark = {"params": 1000, "seq_len": 16, "forward_flops_per_example": 2e6,
                 "cpu": {"flops": 1.6e11, "cores": 2, "mhz": 2500.0, "flop_per_cycle": 32},
                 "variants": variants, "ratios": {"int8_over_float32_p50_1thread": 0.75,
                                                  "dynamic_range_over_float32_p50_1thread": 1.0,
                                                  "keras_over_float32_p50": 10.0,
                                                  "keras_over_float32_p50_2threads": 8.0,
                                                  "dense_only_int8_over_float32_p50_1thread": 0.62},
                 "dense_only": {"float32": lat(0.25), "int8": lat(0.155)},
                 "training": {"stage_seconds": 100.0, "stage_examples_per_s": 1000.0,
                              "padded": {"examples_per_s": 500.0, "epoch_seconds": 60.0},
                              "bucketed": {"examples_per_s": 1500.0, "epoch_seconds": 20.0},
                              "bucketing_speedup": 3.0, "padded_flops_per_s": 3e9, "padded_fraction_of_peak": 0.02}}
    history = [{"epoch": 0, "loss": 0.6, "val_loss": 0.5, "accuracy": 0.7, "val_accuracy": 0.75},
               {"epoch": 1, "loss": 0.4, "val_loss": 0.45, "accuracy": 0.8, "val_accuracy": 0.8}]
    for name, obj in (("compression", compression), ("benchmark", benchmark), ("history", history)):
        (d / f"{name}.json").write_text(json.dumps(obj))
    unkeyed = {"config": {}, "inputs": {}}
    manifest.record(d, "train", unkeyed, ["labels.txt", "vocab.txt", "history.json"])
    manifest.record(d, "compress", unkeyed, [f"tflite/{n}.tflite" for n in names] + ["compression.json"])
    manifest.record(d, "benchmark", unkeyed, ["benchmark.json"])
    return d


def test_report_renders_from_fixture_files(tmp_path):
    from conftest import tiny_overrides
    from pipeline.core.config import load_config
    from pipeline.stages.report import run_report_stage

    d = fixture_run(tmp_path)
    result = run_report_stage(load_config(None, tiny_overrides(tmp_path)), "fx")
    # int8 is within 1 point of the best accuracy and smaller than float32; pruned_qat_int8 is not
    assert result["recommended"] == "int8"
    md = (d / "report.md").read_text()
    assert "| int8 | 89.50 |" in md and "| keras | 90.00 |" in md and "SOFTMAX:int8×2" in md
    assert "3.00x" in md and "0.75" in md and "10.0x faster than Keras through tf.function at 1 thread, 8.0x at 2" in md
    assert "0.250 ms in float32 and 0.155 ms in int8 at 1 thread: int8 / float32 = **0.62**" in md
    html = (d / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<td>pruned_qat_int8</td>" in html
    for name in ("accuracy_vs_size", "accuracy_vs_latency", "confusion_matrix", "training_curves"):
        png = (d / "report" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and f"report/{name}.png" in md
    assert list((tmp_path / "runs" / "fx" / "report").glob("events.out.tfevents.*"))
    mobile = d / "mobile"
    assert (mobile / "model.tflite").read_bytes() == b"int8"  # the recommended file, copied
    assert (mobile / "labels.txt").read_text() == "neg\npos\n" and (mobile / "vocab.txt").is_file()
    card = (mobile / "model_card.md").read_text()
    assert "89.50%" in card and "TextClassifier" in card and "createFromOptions" in card and "p50 0.300 ms" in card


def test_pareto_front():
    from pipeline.measure.compare import pareto_front

    points = [(1.0, 80.0), (2.0, 85.0), (3.0, 84.0), (0.5, 70.0), (2.0, 85.0 - 1e-9)]
    assert sorted(pareto_front(points)) == [0, 1, 3]
    assert np.all(np.diff([points[i][0] for i in sorted(pareto_front(points))]) != 0)


def test_one_recommendation_per_goal():
    from pipeline.measure.compare import recommendations

    def row(name, accuracy, gzip_mb, p50):
        return {"variant": name, "accuracy": accuracy, "gzip_bytes": int(gzip_mb * 1e6), "p50_ms": p50}

    rows = [row("keras", 0.95, 9.0, 0.01),  # neither it nor the baseline is a .tflite to ship
            row("float32", 0.900, 3.7, 0.20), row("float16", 0.900, 1.9, 0.22), row("int8", 0.891, 0.7, 0.45),
            row("pruned_qat_int8", 0.880, 0.3, 0.10),  # smallest and fastest, but 2 points down
            row("baseline", 0.99, 0.1, None)]
    picked = {goal: r["variant"] for goal, r in recommendations(rows).items()}
    assert picked == {"smallest": "int8", "fastest": "float32", "most_accurate": "float16"}  # a tie goes to the smaller


def test_report_gives_each_goal_its_numbers_and_ships_what_report_ship_says(tmp_path):
    from conftest import tiny_overrides
    from pipeline.core.config import load_config
    from pipeline.core.errors import PipelineError
    from pipeline.stages.report import run_report_stage

    d = fixture_run(tmp_path)
    # fixture: float32 90.0% 3.7 MB 0.40 ms; int8 89.5% 0.7 MB 0.30 ms; pruned_qat_int8 85.0% 0.3 MB 0.31 ms
    assert run_report_stage(load_config(None, tiny_overrides(tmp_path)), "fx")["goals"] == {
        "smallest": "int8", "fastest": "int8", "most_accurate": "float32"}
    md = (d / "report.md").read_text()
    assert "Smallest download (phones): **int8**: 89.50% dev accuracy, 0.67 MB gzipped, p50 0.300 ms at 1 thread" in md
    assert "Fastest on the benchmark CPU (2 cores, 2500 MHz): **int8**: 89.50%" in md
    assert "Best accuracy: **float32**: 90.00% dev accuracy, 3.53 MB gzipped, p50 0.400 ms at 1 thread" in md
    assert (d / "mobile" / "model.tflite").read_bytes() == b"int8"

    listed = "compress.variants={float32: [float32], int8: [int8], pruned_qat_int8: [prune, prune_qat, int8]}"
    for ship, shipped in (("most_accurate", b"float32"), ("pruned_qat_int8", b"pruned_qat_int8")):
        result = run_report_stage(load_config(None, tiny_overrides(tmp_path, listed, f"report.ship={ship}")), "fx")
        assert result["recommended"] == shipped.decode() and (d / "mobile" / "model.tflite").read_bytes() == shipped
        assert f"report.ship {ship}" in (d / "mobile" / "model_card.md").read_text()
    with pytest.raises(PipelineError, match="report.ship: run 'fx' has no variant 'float16'"):
        run_report_stage(load_config(None, tiny_overrides(tmp_path, "report.ship=float16")), "fx")


def test_tradeoff_plot_labels_never_overlap_and_ticks_read_plain_numbers():
    from pipeline.measure.plots import tradeoff_figure

    names = ["float32", "float16", "dynamic_range", "int8", "qat_int8", "pruned_int8", "pruned_qat_int8"]
    p50 = [0.30, 0.30, 0.69, 0.70, 0.70, 0.71, 0.70]
    accuracy = [0.900, 0.900, 0.899, 0.895, 0.8935, 0.893, 0.892]
    rows = [{"variant": n, "accuracy": a, "p50_ms": p} for n, a, p in zip(names, accuracy, p50)]
    rows.append({"variant": "keras", "accuracy": 0.900, "p50_ms": 4.0})
    fig = tradeoff_figure(rows, "p50_ms", "p50 (ms, log)")
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == ["dynamic_range", "float32, float16", "int8", "keras",
                                                     "pruned_int8", "pruned_qat_int8", "qat_int8"]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    ticks = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
    assert {"0.3", "1", "2"} <= set(ticks) and all(t.replace(".", "").isdigit() for t in ticks), ticks


def test_training_speed_times_slow_steps_for_its_budget_only(toy_data, tmp_path):
    """A long-text backbone run takes ~14 s a step: benchmark times about budget_s of steps, not 115 of them."""
    from conftest import tiny_overrides
    from pipeline.measure.training_speed import training_speed
    from pipeline.core.config import load_config
    from pipeline.stages.data import run_data_stage

    cfg = load_config(None, tiny_overrides(tmp_path))
    run_data_stage(cfg, str(toy_data), "toy")
    full = training_speed(cfg, "toy", bucketing=False, steps=6, warmup=2)
    assert full["steps_timed"] == 6 and full["ms_per_step"] > 0
    capped = training_speed(cfg, "toy", bucketing=True, steps=6, warmup=2, budget_s=0.0)  # every step too slow
    assert capped["steps_timed"] == 3 and capped["epoch_seconds"] > 0
    assert "mean of 3 timed steps" in capped["note"]


def test_latency_ratios_keep_two_significant_digits_when_small():
    from pipeline.stages.report import _ratio

    assert [_ratio(x) for x in (1.03, 0.75, 0.1, 0.0427, 0.00427)] == ["1.03", "0.75", "0.10", "0.043", "0.0043"]
