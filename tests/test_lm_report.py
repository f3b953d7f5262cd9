"""The language model's compress (TFMOT recipes of lm.variants) -> benchmark -> report: the variants' table, the
ship rule (lm.ship_margin bits per char), three samples, and mobile/ that `pipeline generate` runs."""
import json

import pytest
from conftest import sets

from pipeline.__main__ import main
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.lm.report import lm_goals, sample_prompts

VERSE = "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
LM = ["lm.context=16", "lm.d_model=16", "lm.num_heads=2", "lm.num_layers=1", "lm.ff_dim=32", "lm.ngram_order=3",
      "lm.batch_size=8", "lm.steps=40", "lm.eval_every=20", "lm.learning_rate=0.01", "lm.warmup_steps=5",
      "lm.mixed_precision=float32", "lm.baseline_order=3", "lm.prune_steps=8", "lm.qat_steps=4",
      "lm.variants={float32: [float32], float16: [float16], int8: [int8], pruned_int8: [prune, int8], "
      "qat_int8: [qat, int8], pruned_qat_int8: [prune, prune_qat, int8]}"]


def row(name, bpc, size, speed):
    return {"variant": name, "bits_per_char": bpc, "gzip_bytes": size, "bytes": size,
            "decode_tokens_per_second": speed}


def test_ship_rule_keeps_to_the_margin():
    rows = [row("float32", 2.00, 400, 100), row("int8", 2.04, 100, 150), row("pruned_int8", 2.30, 50, 300)]
    assert lm_goals(rows, 0.05) == {"smallest": "int8", "fastest": "int8", "most_accurate": "float32"}
    assert lm_goals(rows, 0.5) == {"smallest": "pruned_int8", "fastest": "pruned_int8", "most_accurate": "float32"}
    assert lm_goals(rows, 0.0)["smallest"] == "float32"


def test_sample_prompts_start_at_lines():
    dev = "soft\n\nROMEO:\nBut soft\n\nJULIET:\nAy me\n\nNURSE:\nAnon\n"
    prompts = sample_prompts(dev, 3, length=6)
    assert prompts[0] == "ROMEO:" and len(prompts) == 3
    assert all(p and f"\n{p}" in dev and not p.startswith("\n") for p in prompts)


def test_lm_variants_are_checked():
    with pytest.raises(PipelineError, match="lm.variants.x: step 'lowrank' is not one of the language model's"):
        load_config(None, ["lm.variants={float32: [float32], x: [lowrank, int8]}"])
    with pytest.raises(PipelineError, match="lm.variants needs float32"):
        load_config(None, ["lm.variants={int8: [int8]}"])
    assert load_config(None, ["report.ship=qat_int8", "lm.variants={float32: [float32], qat_int8: [qat, int8]}"])


@pytest.mark.e2e
def test_compress_benchmark_report_and_generate_from_mobile(tmp_path, capsys):
    data = tmp_path / "verse"
    data.mkdir()
    for name, text in (("train", VERSE * 6), ("dev", VERSE * 2)):
        (data / f"{name}.txt").write_text(text, encoding="utf-8")
    args = sets([f"paths.data={tmp_path}/data", f"paths.models={tmp_path}/saved_models",
                 f"paths.runs={tmp_path}/runs", *LM])
    assert main(["data", "--data", str(data), *args]) == 0
    for stage in ("train", "compress", "benchmark", "report"):
        assert main([stage, *args]) == 0, stage
    model_dir = tmp_path / "saved_models" / "verse"
    variants = json.loads((model_dir / "compression.json").read_text())["variants"]
    assert list(variants) == ["float32", "float16", "int8", "pruned_int8", "qat_int8", "pruned_qat_int8"]
    assert variants["pruned_int8"]["sparsity"] > 0.45 and variants["pruned_qat_int8"]["sparsity"] > 0.45
    assert variants["qat_int8"]["recipe"] == ["qat", "int8"]
    report = (model_dir / "report.md").read_text()
    for name in variants:
        assert f"| {name} |" in report
    assert "Kneser-Ney" in report and "keras (float32)" in report and report.count("```") == 6
    assert "<pre>" in (model_dir / "report.html").read_text()
    assert sorted(p.name for p in (model_dir / "mobile").iterdir()) == ["model.tflite", "model_card.md",
                                                                       "tokenizer.json"]
    # the shipped file is the smallest within lm.ship_margin of the best bits per char (report.ship smallest)
    bench = json.loads((model_dir / "benchmark.json").read_text())["variants"]
    best = min(r["dev_bits_per_char"] for r in bench.values())
    ok = [n for n, r in bench.items() if r["dev_bits_per_char"] <= best + 0.05]
    shipped = min(ok, key=lambda n: variants[n]["gzip_bytes"])
    mobile = (model_dir / "mobile" / "model.tflite").read_bytes()
    assert mobile == (model_dir / "tflite" / f"{shipped}.tflite").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir / "mobile" / "model.tflite"), "When", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("When")
    assert main(["report", *args, "--set", "report.ship=nope"]) == 2
    assert "'report.ship' must be one of" in capsys.readouterr().err
