"""Report stage (`make report`): one comparison of every variant (quality from compression.json, cost from
benchmark.json, the bag-of-words baseline from metrics.json) as saved_models/<run>/report.md, report.html, PNG
plots and TensorBoard summaries, the error analysis of the shipped variant, and that variant as a mobile bundle
with a model card (mobile/)."""
import html
import json
from pathlib import Path
from types import SimpleNamespace

import tensorflow as tf

from pipeline.core import files, manifest
from pipeline.core.errors import PipelineError
from pipeline.lm.report import write_lm_report
from pipeline.measure.compare import GOALS, recommendations, variant_rows, verdict
from pipeline.measure.search import report_section as search_section
from pipeline.measure.privacy import privacy_fact, privacy_markdown
from pipeline.measure.tables import html_table, markdown_table
from pipeline.text.processed import processed_dir

MB = 1024 * 1024


def run_report_stage(cfg, run):
    """`python -m pipeline report`: saved_models/<run>/report.md, report.html and report/*.png."""
    model_dir = Path(cfg.paths.models) / run
    if _load(model_dir / "compression.json", "compress").get("task") == "lm":
        return write_lm_report(cfg, run, model_dir, processed_dir(cfg, run))
    inputs = read_inputs(model_dir)
    compression, benchmark = inputs.compression, inputs.benchmark
    key = stage_key(cfg, model_dir, inputs)
    rows = variant_rows(compression, benchmark, inputs.metrics.get("baseline"))
    goals = {goal: r["variant"] for goal, r in recommendations(rows).items()}
    ship = cfg.report.ship
    best = goals.get(ship, ship)  # the variant mobile/ holds
    if best not in compression["variants"]:
        raise PipelineError(f"report.ship: run '{run}' has no variant '{best}' (variants in "
                            f"{model_dir / 'compression.json'}: {', '.join(compression['variants'])})")
    result = {"recommended": best, "goals": goals, "rows": rows}
    if manifest.up_to_date(model_dir, "report", key):
        return result
    manifest.begin(model_dir, "report")
    # imported only now: the error analysis loads the Keras model code (TFMOT), ~1 s an up-to-date report skips
    from pipeline.measure.error_analysis import report_section

    images = draw(model_dir, rows, compression, inputs.history, best)
    main, ops = build_tables(rows, benchmark)
    errors_md, errors_html = report_section(cfg, run, model_dir, best)  # also TensorBoard's runs/<run>/explain
    search_md, search_html = search_section(model_dir)  # make search's Pareto front, when the run has one
    errors_md, errors_html = errors_md + search_md, errors_html + search_html
    page = SimpleNamespace(run=run, versus=versus_baseline(compression, inputs.metrics), main=main, ops=ops,
                           facts=facts(rows, goals, best, ship, benchmark, compression)
                           + privacy_fact(inputs.metrics.get("privacy")),
                           placement=placement_note(benchmark), images=images)
    files.write_text(model_dir / "report.md", markdown_page(page, errors_md))
    files.write_text(model_dir / "report.html", html_page(page, errors_html))
    log_tensorboard(Path(cfg.paths.runs) / run / "report", page)
    mobile = write_mobile_bundle(model_dir, run, best, compression, benchmark, ship, inputs.metrics.get("privacy"))
    manifest.record(model_dir, "report", key, ["report.md", "report.html", "report", "mobile"])
    print(f"report {run}: smallest {goals['smallest']}, fastest {goals['fastest']}, most accurate "
          f"{goals['most_accurate']}; mobile/ holds {best} (report.ship {ship}) -> {model_dir / 'report.md'}, "
          f"{mobile}/model.tflite")
    return result


def read_inputs(model_dir):
    """compression.json, benchmark.json, history.json and metrics.json (the baseline's scores; runs trained before
    it existed have none: {})."""
    has_metrics = (model_dir / "metrics.json").is_file()
    return SimpleNamespace(compression=_load(model_dir / "compression.json", "compress"),
                           benchmark=_load(model_dir / "benchmark.json", "benchmark"),
                           history=_load(model_dir / "history.json", "train"), has_metrics=has_metrics,
                           metrics=_load(model_dir / "metrics.json", "train") if has_metrics else {})


def stage_key(cfg, model_dir, inputs):
    """What the report depends on: report.* and the files it reads (each variant's .tflite: mobile/ copies one)."""
    return {"config": {"report": cfg.to_dict()["report"]}, "inputs": manifest.inputs(model_dir, [
        "compression.json", "benchmark.json", "history.json", "labels.txt", "vocab.txt",
        *(["metrics.json"] if inputs.has_metrics else []),
        *(["search/pareto.json"] if (model_dir / "search" / "pareto.json").is_file() else []),
        *(f"tflite/{n}.tflite" for n in inputs.compression["variants"])], "model")}


def draw(model_dir, rows, compression, history, best):
    """report/*.png: accuracy against size and latency, the shipped variant's confusion matrix, training curves."""
    # matplotlib (~0.5 s to import) only when drawing: an up-to-date report draws nothing
    from pipeline.measure.plots import plot_confusion_matrix, plot_tradeoff, plot_training_curves

    labels = [line for line in (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() if line]
    out = model_dir / "report"
    return {
        "accuracy_vs_size": plot_tradeoff(rows, "gzip_bytes", "gzip size (MB, log)", out / "accuracy_vs_size.png",
                                          1 / MB),
        "accuracy_vs_latency": plot_tradeoff(rows, "p50_ms", "p50 latency at 1 thread (ms, log)",
                                             out / "accuracy_vs_latency.png"),
        "confusion_matrix": plot_confusion_matrix(compression["variants"][best]["dev"]["confusion_matrix"], labels,
                                                  out / "confusion_matrix.png"),
        "training_curves": plot_training_curves(history, out / "training_curves.png"),
    }


def versus_baseline(compression, metrics):
    """One sentence above the table: is the Transformer worth it over the baseline? ("" without a baseline)"""
    baseline = metrics.get("baseline")
    if not baseline:
        return ""
    sentence = verdict(compression["keras"], baseline["dev"])  # the keras row against the baseline row
    if "test" in metrics and "test" in baseline:  # the train stage scored both on the run's test split
        sentence += "; " + verdict(metrics["test"], baseline["test"], "test")
    return (sentence[0].upper() + sentence[1:] + ". The baseline row is TF-IDF word and character "
            "n-grams with a logistic regression, fitted on the same train split.")


def facts(rows, goals, best, ship, benchmark, compression):
    """The report's bullet points: the variant for each goal, what mobile/ holds, latency ratios, training speed,
    the model's size, the student, what the recipes' steps left, the energy unit."""
    r, t = benchmark["ratios"], benchmark["training"]
    by_name = {r["variant"]: r for r in rows}
    cpu = benchmark["cpu"]
    headings = {"smallest": "Smallest download (phones)",
                "fastest": f"Fastest on the benchmark CPU ({cpu['cores']} cores, {cpu['mhz']:.0f} MHz)",
                "most_accurate": "Best accuracy"}
    return [
        *(f"{headings[goal]}: **{name}**: {100 * by_name[name]['accuracy']:.2f}% dev accuracy, "
          f"{by_name[name]['gzip_bytes'] / MB:.2f} MB gzipped, p50 {by_name[name]['p50_ms']:.3f} ms at 1 thread "
          f"({GOALS[goal]})." for goal, name in goals.items()),
        f"mobile/ holds **{best}** (report.ship: {ship}; set it to smallest, fastest, most_accurate or a "
        "variant name).",
        "p50 latency / float32's at 1 thread: " + ", ".join(
            f"{k[:-len('_over_float32_p50_1thread')]} **{_ratio(x)}**" for k, x in r.items()
            if k.endswith("_over_float32_p50_1thread") and not k.startswith(("keras", "dense_only"))) + ".",
        f"float32.tflite is {r['keras_over_float32_p50']:.1f}x faster than Keras through tf.function at 1 thread, "
        f"{r['keras_over_float32_p50_2threads']:.1f}x at 2 threads (Keras uses all {benchmark['cpu']['cores']} cores).",
        f"Training stage: {t['stage_seconds']} s, {t['stage_examples_per_s']} examples/s. Measured here: padded "
        f"batches {t['padded']['examples_per_s']:.0f} examples/s (epoch {t['padded']['epoch_seconds']:.0f} s), "
        f"length bucketing {t['bucketed']['examples_per_s']:.0f} examples/s (epoch {t['bucketed']['epoch_seconds']:.0f} s): "
        f"**{t['bucketing_speedup']:.2f}x** faster. Padded training reaches {t['padded_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"{100 * t['padded_fraction_of_peak']:.1f}% of this CPU's fp32 peak "
        f"({benchmark['cpu']['flops'] / 1e9:.0f} GFLOP/s = {benchmark['cpu']['cores']} cores x "
        f"{benchmark['cpu']['mhz']:.0f} MHz x {benchmark['cpu']['flop_per_cycle']} FLOP/cycle).",
        f"Model: {benchmark['params']:,} parameters, {benchmark['forward_flops_per_example'] / 1e6:.1f} MFLOP per example "
        f"at seq_len {benchmark['seq_len']}.",
        *([student_fact(benchmark, compression)] if "student" in benchmark else []),
        *step_facts(compression),
        "Energy: " + ("joules" if any("joules" in k for v in benchmark["variants"].values()
                                       for k in v["latency"].get("threads_1", {})) else
                      "CPU-seconds per 1,000 inferences at 1 thread (no RAPL counters on this machine)") + ".",
    ]


def placement_note(benchmark):
    """What the op-placement table shows, and the int8 ceiling measured on the dense layers alone."""
    placement = ("XNNPACK (LiteRT's default CPU delegate) takes whole subgraphs; every op it cannot run splits the "
                 "graph and runs on TFLite's builtin kernels instead.")
    if "dense_only" in benchmark:  # absent from benchmark.json files written before it was measured
        dense, r = benchmark["dense_only"], benchmark["ratios"]
        placement += (f" The model's dense layers alone (same shapes, all on XNNPACK, no attention scores, norms, "
                      f"softmax or GELU) take {dense['float32']['p50_ms']:.3f} ms in float32 and "
                      f"{dense['int8']['p50_ms']:.3f} ms in int8 at 1 thread: int8 / float32 = "
                      f"**{r['dense_only_int8_over_float32_p50_1thread']:.2f}**, the lowest ratio int8 can reach for "
                      f"this model on this CPU.")
    return placement


def markdown_page(page, errors_md):
    """report.md: facts, the variants table (after the baseline sentence), op placement, errors, plots."""
    md = [f"# liteformer report: {page.run}", "", *[f"- {f}" for f in page.facts], "", "## Variants (dev set)", "",
          *([page.versus, ""] if page.versus else []), markdown_table(page.main), "", "## Where LiteRT runs each op",
          "", page.placement, "", markdown_table(page.ops), "", *errors_md]
    md += [f"![{name}](report/{Path(p).name})" for name, p in page.images.items()]
    return "\n".join(md) + "\n"


def html_page(page, errors_html):
    """report.html: the same as report.md, as one page."""
    run, versus = page.run, page.versus
    body = "".join(f"<li>{html.escape(f).replace('**', '')}</li>" for f in page.facts)
    imgs = "".join(f'<figure><img src="report/{Path(p).name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                   for name, p in page.images.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>liteformer report: {html.escape(run)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>liteformer report: {html.escape(run)}</h1><ul>{body}</ul><h2>Variants (dev set)</h2>"
            f"{f'<p>{html.escape(versus)}</p>' if versus else ''}{html_table(page.main)}"
            f"<h2>Where LiteRT runs each op</h2><p>{html.escape(page.placement).replace('**', '')}</p>"
            f"{html_table(page.ops)}{errors_html}{imgs}</body></html>\n")


def log_tensorboard(log_dir, page):
    """The report's tables, facts and plots in TensorBoard (runs/<run>/report), replacing earlier ones."""
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    with tf.summary.create_file_writer(str(log_dir)).as_default():
        tf.summary.text("report/variants", (page.versus + "\n\n" if page.versus else "") + markdown_table(page.main),
                        step=0)
        tf.summary.text("report/op_placement", page.placement + "\n\n" + markdown_table(page.ops), step=0)
        tf.summary.text("report/summary", "\n".join(f"- {f}" for f in page.facts), step=0)
        for name, p in page.images.items():
            tf.summary.image(f"report/{name}", tf.image.decode_png(Path(p).read_bytes(), channels=4)[None], step=0)


def _load(path, stage):
    if not Path(path).is_file():
        raise PipelineError(f"{path}: not found; run `python -m pipeline {stage}` first")
    return json.loads(Path(path).read_text())


def _fmt(value, spec, scale=1.0):
    return "–" if value is None else format(value * scale, spec)


def build_tables(rows, benchmark):
    """(main table, op-placement table) as lists of rows of strings, header first."""
    main = [["variant", "accuracy %", "macro F1", "size MB", "gzip MB", "sparsity", "p50 ms (1 thr)",
             "p99 ms (1 thr)", "p50 ms (2 thr)", "examples/s", "peak RSS MB", "load ms", "energy"]]
    for r in rows:
        main.append([r["variant"], _fmt(r["accuracy"], ".2f", 100), _fmt(r["macro_f1"], ".4f"),
                     _fmt(r["bytes"], ".2f", 1 / MB), _fmt(r["gzip_bytes"], ".3f", 1 / MB),
                     _fmt(r["sparsity"], ".2f"), _fmt(r["p50_ms"], ".3f"), _fmt(r["p99_ms"], ".3f"),
                     _fmt(r["p50_2t_ms"], ".3f"), _fmt(r["throughput"], ",.0f"),
                     _fmt(r["peak_rss_kb"], ".0f", 1 / 1024), _fmt(r["load_ms"], ".1f"), _fmt(r["energy"], ".3f")])
    ops = [["variant", "XNNPACK partitions", "p50 / float32 (1 thr)", "matmul MFLOP",
            "ops on builtin kernels (not delegated)"]]
    f32 = benchmark["variants"]["float32"]["latency"]["threads_1"]["p50_ms"]
    for name, v in benchmark["variants"].items():
        if "ops" in v:
            fallback = ", ".join(f"{k}×{n}" for k, n in v["ops"]["builtin_fallback"].items())
            ops.append([name, str(v["ops"]["xnnpack_partitions"]), _ratio(v["latency"]["threads_1"]["p50_ms"] / f32),
                        _fmt(v.get("matmul_flops"), ".1f", 1e-6), fallback or "none"])
    return main, ops


def _ratio(x):
    """Two decimals, or two significant digits below 0.1: a student's 0.0043 of float32's time is not 0.00."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


MODEL_CARD = """# {name}

Transformer text classifier trained by liteformer on `{run}`; variant **{variant}** (chosen by
`make report` with report.ship {ship}: {why}).

| | |
|---|---|
| inputs | `input_word_ids`, `input_mask`, `input_type_ids`: int32 [1, {seq_len}] (MediaPipe BERT classifier inputs; the tokenizer and `vocab.txt` are in the file's metadata) |
| output | probabilities of {labels} |
| dev accuracy | {accuracy:.2%} (LiteRT), {mp_accuracy:.2%} through MediaPipe Tasks ({agreement:.2%} of predictions agree) |
| size | {bytes:,} bytes ({gzip:,} gzipped) |
| latency | p50 {p50:.3f} ms, p99 {p99:.3f} ms at 1 thread on the benchmark machine (LiteRT, batch 1) |
| peak memory | {rss:.0f} MB resident for a process that loads and runs it |

Python (`pip install mediapipe`):

```python
from mediapipe.tasks import python as mp
from mediapipe.tasks.python import text

options = text.TextClassifierOptions(base_options=mp.BaseOptions(model_asset_path="model.tflite"))
with text.TextClassifier.create_from_options(options) as classifier:
    result = classifier.classify("a gripping, beautifully acted film")
    top = result.classifications[0].categories[0]
    print(top.category_name, top.score)
```

Kotlin (Android, `com.google.mediapipe:tasks-text`; model.tflite in `src/main/assets`):

```kotlin
val options = TextClassifier.TextClassifierOptions.builder()
    .setBaseOptions(BaseOptions.builder().setModelAssetPath("model.tflite").build())
    .build()
val classifier = TextClassifier.createFromOptions(context, options)
val result = classifier.classify("a gripping, beautifully acted film")
val top = result.classificationResult().classifications()[0].categories()[0]
Log.i("liteformer", "${{top.categoryName()}} ${{top.score()}}")
classifier.close()
```
"""


def write_mobile_bundle(model_dir, run, variant, compression, benchmark, ship, privacy=None):
    """saved_models/<run>/mobile/: the .tflite chosen by report.ship `ship` as model.tflite, labels.txt,
    vocab.txt and model_card.md, written whole or not at all."""
    v, b = compression["variants"][variant], benchmark["variants"][variant]
    labels = [line for line in (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() if line]
    card = MODEL_CARD.format(
        name=f"liteformer-{run}-{variant}", run=run, variant=variant, ship=ship,
        why=GOALS.get(ship, "the variant the config names"), seq_len=benchmark["seq_len"],
        labels=", ".join(f"`{label}`" for label in labels), accuracy=v["accuracy"],
        mp_accuracy=v["mediapipe"]["accuracy"], agreement=v["mediapipe"]["agreement"], bytes=v["bytes"],
        gzip=v["gzip_bytes"], p50=b["latency"]["threads_1"]["p50_ms"], p99=b["latency"]["threads_1"]["p99_ms"],
        rss=b["peak_rss_kb"] / 1024) + privacy_markdown(privacy, v.get("recipe"))  # older files: no recipe
    with files.atomic_path(model_dir / "mobile") as tmp:
        tmp.mkdir()
        # not v["path"]: compress records it relative to the directory it ran in
        (tmp / "model.tflite").write_bytes((model_dir / "tflite" / f"{variant}.tflite").read_bytes())
        for name in ("labels.txt", "vocab.txt"):
            (tmp / name).write_bytes((model_dir / name).read_bytes())
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
    return model_dir / "mobile"


def student_fact(benchmark, compression):
    """One line: the distilled student against its teacher (the Keras model) in size, FLOPs and accuracy."""
    st, v = benchmark["student"], compression["variants"]
    teacher = compression["keras"]["accuracy"]
    accs = ", ".join(f"{n} {100 * r['accuracy']:.2f}%" for n, r in v.items() if r["recipe"][0] == "student")
    return (f"Distilled student: {st['params']:,} parameters ({st['params'] / benchmark['params']:.2f}x the teacher's), "
            f"{st['forward_flops_per_example'] / 1e6:.1f} MFLOP per example "
            f"({st['forward_flops_per_example'] / benchmark['forward_flops_per_example']:.2f}x); dev accuracy {accs} "
            f"against the teacher's {100 * teacher:.2f}%.")


def step_facts(compression):
    """Lines on what the recipes' steps left in the kernels: low-rank ranks, distinct values after clustering."""
    out = []
    for prefix, stats in compression.get("step_stats", {}).items():
        step = prefix.split("+")[-1]
        if step == "lowrank":
            ranks = ", ".join(f"{k.split('/')[-1].removesuffix('_kernel')} {r if r else 'whole'}/{full}"
                              for k, (r, full) in stats.items())
            out.append(f"Low-rank ({prefix}): rank of each factorised kernel / its full rank: {ranks}.")
        elif step == "cluster":
            out.append(f"Clustering ({prefix}): distinct values per kernel: "
                       + ", ".join(f"{k.split('/')[-1]} {n}" for k, n in stats.items()) + ".")
    return out
