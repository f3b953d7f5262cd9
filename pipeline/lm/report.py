"""The report of a language-model run (`make report`, data.task lm): every lm.variants .tflite's dev bits per
character through LiteRT, size, time to first token and decode speed at 1 thread, against the float Keras model
and the Kneser-Ney baseline; three generated samples from the shipped file; and that file in mobile/ with the
tokenizer and a model card, so `python -m pipeline generate --model <run>/mobile/model.tflite PROMPT` runs."""
import html
import json
import re
from pathlib import Path

from pipeline.core import files, manifest
from pipeline.core.errors import PipelineError
from pipeline.lm.export import LiteRTLM
from pipeline.lm.generate import generate
from pipeline.lm.tokenizer import load_tokenizer
from pipeline.measure.tables import html_table, markdown_table

MB = 1e6
# report.ship for a language model: the rule of the classifier's, with lm.ship_margin bits per char as its margin
LM_GOALS = {"smallest": "smallest gzip size within lm.ship_margin bits per char of the best .tflite",
            "fastest": "most decode tokens/s at 1 thread within lm.ship_margin bits per char of the best .tflite",
            "most_accurate": "fewest dev bits per char"}
SAMPLE_SEEDS = (0, 1, 2)  # one sample per seed, each from its own prompt
SAMPLE_TOKENS = 200
SAMPLE_TEMPERATURE = 0.8
LINE_START = re.compile(r"\n(?=[^\n])")  # a newline before a non-empty line


def lm_rows(compression, benchmark):
    """One row per variant: recipe, size, gzip size, sparsity, dev bits per char (LiteRT), speed at 1 thread."""
    speed = benchmark["variants"]
    return [{"variant": name, "recipe": "+".join(v.get("recipe", [name])), "bytes": v["bytes"],
             "gzip_bytes": v.get("gzip_bytes"), "sparsity": v.get("sparsity"),
             "ngram_sparsity": v.get("ngram_sparsity"),
             "bits_per_char": speed[name]["dev_bits_per_char"],
             "time_to_first_token_ms": speed[name]["time_to_first_token_ms"],
             "decode_tokens_per_second": speed[name]["decode_tokens_per_second"]}
            for name, v in compression["variants"].items() if name in speed]


def lm_goals(rows, margin):
    """{goal: variant name}: smallest and fastest among the rows within `margin` bits per char of the best."""
    best = min(r["bits_per_char"] for r in rows)
    ok = [r for r in rows if r["bits_per_char"] <= best + margin]
    return {"smallest": min(ok, key=lambda r: (_size(r), -r["decode_tokens_per_second"]))["variant"],
            "fastest": min(ok, key=lambda r: (-r["decode_tokens_per_second"], _size(r)))["variant"],
            "most_accurate": min(rows, key=lambda r: (r["bits_per_char"], _size(r)))["variant"]}


def _size(row):
    """The download: gzip size (a pruned file's zeros compress), or the file's size in runs compressed before it."""
    return row["gzip_bytes"] or row["bytes"]


def sample_prompts(dev, count, length=32):
    """`count` prompts: the first `length` characters of the first non-empty dev line starting after 0, 1/count,
    2/count .. of dev (a text file's first line may start mid-sentence)."""
    prompts = []
    for i in range(count):
        found = LINE_START.search(dev, i * len(dev) // count)
        start = found.end() if found else 0
        prompts.append(dev[start:start + length])
    return prompts


def samples(path, tokenizer, dev):
    """[{prompt, seed, text}]: SAMPLE_TOKENS generated characters per seed from the .tflite file at `path`."""
    lm = LiteRTLM(path, threads=1)
    return [{"prompt": prompt, "seed": seed, "text": generate(lm, tokenizer, prompt, max_tokens=SAMPLE_TOKENS,
                                                              temperature=SAMPLE_TEMPERATURE, seed=seed)["text"]}
            for prompt, seed in zip(sample_prompts(dev, len(SAMPLE_SEEDS)), SAMPLE_SEEDS)]


def lm_table(rows, metrics):
    """The variants table (header first), with the float Keras model and the Kneser-Ney baseline below."""
    def fmt(x, spec, scale=1.0):
        return "–" if x is None else format(x * scale, spec)
    table = [["variant", "recipe", "dev bits/char (LiteRT)", "size MB", "gzip MB", "sparsity", "n-gram table zeros",
              "time to first token ms (1 thr)", "decode tokens/s (1 thr)"]]
    for r in rows:
        table.append([r["variant"], r["recipe"], fmt(r["bits_per_char"], ".4f"), fmt(r["bytes"], ".2f", 1 / MB),
                      fmt(r["gzip_bytes"], ".2f", 1 / MB), fmt(r["sparsity"], ".2f"), fmt(r["ngram_sparsity"], ".2f"),
                      fmt(r["time_to_first_token_ms"], ".1f"), fmt(r["decode_tokens_per_second"], ".0f")])
    table.append(["keras (float32)", "trained model", fmt(metrics["dev"]["bits_per_char"], ".4f"),
                  *["–"] * 6])
    if "baseline" in metrics:
        table.append(["baseline", metrics["baseline"]["model"], fmt(metrics["baseline"]["dev"]["bits_per_char"], ".4f"),
                      *["–"] * 6])
    return table


def lm_facts(rows, goals, shipped, ship, margin, metrics):
    """The report's bullet points: the variant for each goal, what mobile/ holds, the model against the baseline."""
    by_name = {r["variant"]: r for r in rows}
    out = [f"{goal}: **{name}**: {by_name[name]['bits_per_char']:.4f} bits/char, "
           f"{by_name[name]['bytes'] / MB:.2f} MB, {by_name[name]['decode_tokens_per_second']:.0f} tokens/s "
           f"({LM_GOALS[goal]})." for goal, name in goals.items()]
    out.append(f"mobile/ holds **{shipped}** (report.ship: {ship}; lm.ship_margin: {margin} bits per char): "
               "model.tflite, tokenizer.json, model_card.md.")
    keras = metrics["dev"]["bits_per_char"]
    out.append(f"Float Keras model: {keras:.4f} bits/char on dev; the shipped file is "
               f"{by_name[shipped]['bits_per_char'] - keras:+.4f} from it.")
    if "baseline" in metrics:
        kn = metrics["baseline"]["dev"]["bits_per_char"]
        out.append(f"{metrics['baseline']['model']}: {kn:.4f} bits/char ({kn - keras:+.4f} from the Transformer).")
    return out


def ship_choice(cfg, rows, run, model_dir):
    """(goals, the variant report.ship names) or a PipelineError naming the missing variant."""
    goals = lm_goals(rows, cfg.lm.ship_margin)
    shipped = goals.get(cfg.report.ship, cfg.report.ship)
    if shipped not in {r["variant"] for r in rows}:
        raise PipelineError(f"report.ship: run '{run}' has no variant '{shipped}' (variants in "
                            f"{model_dir / 'compression.json'}: {', '.join(r['variant'] for r in rows)})")
    return goals, shipped


def write_lm_report(cfg, run, model_dir, processed):
    """saved_models/<run>/report.md, report.html and mobile/ of a language-model run; {"recommended", "goals",
    "rows"}."""
    compression, benchmark = _load(model_dir / "compression.json", "compress"), _load(model_dir / "benchmark.json",
                                                                                     "benchmark")
    metrics = _load(model_dir / "metrics.json", "train")
    rows = lm_rows(compression, benchmark)
    goals, shipped = ship_choice(cfg, rows, run, model_dir)
    result = {"recommended": shipped, "goals": goals, "rows": rows}
    key = {"config": {"report": cfg.to_dict()["report"], "lm_report": {
               "ship_margin": cfg.lm.ship_margin, "seeds": list(SAMPLE_SEEDS), "tokens": SAMPLE_TOKENS,
               "temperature": SAMPLE_TEMPERATURE, "prompts": "line starts after 0, 1/3, 2/3"}},
           "inputs": {**manifest.inputs(model_dir, ["compression.json", "benchmark.json", "metrics.json",
                                                    "tokenizer.json",
                                                    *(v["file"] for v in compression["variants"].values())], "model"),
                      **manifest.inputs(processed, ["dev.txt"], "processed")}}
    if manifest.up_to_date(model_dir, "report", key):
        return result
    manifest.begin(model_dir, "report")
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    dev = (processed / "dev.txt").read_text(encoding="utf-8")
    texts = samples(model_dir / "tflite" / f"{shipped}.tflite", tokenizer, dev)
    page = {"run": run, "facts": lm_facts(rows, goals, shipped, cfg.report.ship, cfg.lm.ship_margin, metrics),
            "table": lm_table(rows, metrics), "samples": texts, "shipped": shipped}
    files.write_text(model_dir / "report.md", markdown_page(page))
    files.write_text(model_dir / "report.html", html_page(page))
    write_mobile_bundle(model_dir, run, shipped, cfg.report.ship, rows, metrics)
    manifest.record(model_dir, "report", key, ["report.md", "report.html", "mobile"])
    print(f"report {run}: smallest {goals['smallest']}, fastest {goals['fastest']}, most accurate "
          f"{goals['most_accurate']}; mobile/ holds {shipped} (report.ship {cfg.report.ship}) -> "
          f"{model_dir / 'report.md'}, {model_dir / 'mobile'}/model.tflite")
    return result


def markdown_page(page):
    md = [f"# liteformer report: {page['run']} (language model)", "", *[f"- {f}" for f in page["facts"]], "",
          "## Variants (dev set)", "", markdown_table(page["table"]), "",
          f"## Samples from mobile/model.tflite ({page['shipped']}; temperature {SAMPLE_TEMPERATURE}, "
          f"{SAMPLE_TOKENS} characters)", ""]
    for s in page["samples"]:
        md += [f"Prompt `{s['prompt']!r}`, seed {s['seed']}:", "", "```", s["prompt"] + s["text"], "```", ""]
    return "\n".join(md)


def html_page(page):
    run = html.escape(page["run"])
    facts = "".join(f"<li>{html.escape(f).replace('**', '')}</li>" for f in page["facts"])
    texts = "".join(f"<p>Prompt <code>{html.escape(repr(s['prompt']))}</code>, seed {s['seed']}:</p>"
                    f"<pre>{html.escape(s['prompt'] + s['text'])}</pre>" for s in page["samples"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>liteformer report: {run}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px}"
            f"</style></head><body><h1>liteformer report: {run} (language model)</h1><ul>{facts}</ul>"
            f"<h2>Variants (dev set)</h2>{html_table(page['table'])}"
            f"<h2>Samples from mobile/model.tflite ({html.escape(page['shipped'])})</h2>{texts}</body></html>\n")


MODEL_CARD = """# liteformer-{run}-{variant}

Character-level causal Transformer language model trained by liteformer on `{run}`; variant **{variant}**
(recipe {recipe}; chosen by `make report` with report.ship {ship}).

| | |
|---|---|
| signatures | `prefill`: `input_ids` int32 [1, {context}] -> `logits` [1, {context}, {vocab}], `k_cache`, `v_cache`; `decode`: `tokens` int32 [1, {recent}] (the last ones, the newest last), `position` int32 [1], `k_cache`, `v_cache` -> `logits` [1, {vocab}] and the updated caches |
| tokenizer | `tokenizer.json`: one id per character (`chars`, after id 0 for any other character) |
| dev bits per character | {bpc:.4f} (LiteRT); the float Keras model {keras:.4f} |
| size | {bytes:,} bytes ({gzip} gzipped) |
| speed | time to first token {ttft:.1f} ms, decode {tps:.0f} tokens/s at 1 thread on the benchmark machine |

Generate: `python -m pipeline generate --model model.tflite "ROMEO:"` (in this directory, with liteformer).
"""


def write_mobile_bundle(model_dir, run, variant, ship, rows, metrics):
    """saved_models/<run>/mobile/: the variant's .tflite as model.tflite, tokenizer.json and model_card.md,
    written whole or not at all."""
    row = next(r for r in rows if r["variant"] == variant)
    path = model_dir / "tflite" / f"{variant}.tflite"
    lm = LiteRTLM(path)
    card = MODEL_CARD.format(run=run, variant=variant, recipe=row["recipe"], ship=ship, context=lm.context,
                             vocab=lm.vocab_size, recent=lm.recent, bpc=row["bits_per_char"],
                             keras=metrics["dev"]["bits_per_char"], bytes=row["bytes"],
                             gzip=f"{row['gzip_bytes']:,}" if row["gzip_bytes"] else "–",
                             ttft=row["time_to_first_token_ms"], tps=row["decode_tokens_per_second"])
    with files.atomic_path(model_dir / "mobile") as tmp:
        tmp.mkdir()
        (tmp / "model.tflite").write_bytes(path.read_bytes())
        (tmp / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
    return model_dir / "mobile"


def _load(path, stage):
    if not Path(path).is_file():
        raise PipelineError(f"{path}: not found; run `python -m pipeline {stage}` first")
    return json.loads(Path(path).read_text())
