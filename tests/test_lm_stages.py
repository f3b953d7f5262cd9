"""The language-model task through the CLI's stages: a directory of plain .txt files is an lm run (data.task auto);
data, train, evaluate (model directory and .tflite), generate, compress and benchmark on a few hundred characters and a tiny model;
one-line errors for empty and too-short text. The classifier's keys do not see the lm section."""
import json

import pytest
from conftest import sets

from pipeline.__main__ import main
from pipeline.core.config import load_config
from pipeline.lm.export import export_tflite
from pipeline.lm.model import load_lm
from pipeline.text.task import resolve_task

VERSE = "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
LM = ["lm.context=16", "lm.d_model=16", "lm.num_heads=2", "lm.num_layers=1", "lm.ff_dim=32", "lm.ngram_order=0",
      "lm.batch_size=8", "lm.steps=40", "lm.eval_every=20", "lm.learning_rate=0.01", "lm.warmup_steps=5",
      "lm.mixed_precision=float32", "lm.baseline_order=3", "lm.prune_steps=4"]


def lm_dir(root, train=VERSE * 6, dev=VERSE * 2, test=VERSE):
    d = root / "verse"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("dev", dev), ("test", test)):
        if text is not None:
            (d / f"{name}.txt").write_text(text, encoding="utf-8")
    return d


def overrides(root):
    return sets([f"paths.data={root}/data", f"paths.models={root}/saved_models", f"paths.runs={root}/runs", *LM])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    assert main(["data", "--data", str(lm_dir(root)), *overrides(root)]) == 0
    assert main(["train", *overrides(root)]) == 0
    return root


def test_task_follows_the_data(tmp_path):
    d = lm_dir(tmp_path)
    assert resolve_task("auto", d) == "lm" and resolve_task("classify", d) == "classify"
    (d / "train.tsv").write_text("sentence\tlabel\na\t0\n")
    assert resolve_task("auto", d) == "classify"
    assert "task" not in load_config(None, ["data.task=lm"]).to_dict()["data"]  # the classifier's keys unchanged


def test_data_and_train_write_the_run(trained, capsys):
    processed = trained / "data" / "processed" / "verse"
    stats = json.loads((processed / "stats.json").read_text())
    assert stats["task"] == "lm" and stats["characters"]["train"] == len(VERSE) * 6
    manifest = json.loads((processed / "manifest.json").read_text())
    assert {"train.txt", "dev.txt", "test.txt", "tokenizer.json", "stats.json"} <= set(manifest["artifacts"])
    model_dir = trained / "saved_models" / "verse"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for split in ("dev", "test"):
        assert {"bits_per_char", "nats_per_token", "perplexity", "accuracy"} <= set(metrics[split])
        assert metrics["baseline"][split]["bits_per_char"] > 0
    assert set(json.loads((model_dir / "manifest.json").read_text())["artifacts"]) >= {"model.keras", "metrics.json"}
    assert main(["train", *overrides(trained)]) == 0  # nothing changed: skipped
    assert "train: up to date" in capsys.readouterr().out


def test_evaluate_and_generate_from_directory_and_tflite(trained, capsys):
    model_dir, dev = trained / "saved_models" / "verse", trained / "verse" / "dev.txt"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dev)]) == 0
    keras = json.loads(capsys.readouterr().out)
    tflite = model_dir / "exported" / "float32.tflite"  # tokenizer.json one directory up
    tflite.parent.mkdir()
    tflite.write_bytes(export_tflite(load_lm(model_dir / "model.keras"), "float32"))
    assert main(["evaluate", "--model", str(tflite), "--data", str(dev)]) == 0
    lite = json.loads(capsys.readouterr().out)
    assert keras["task"] == "lm" and abs(keras["bits_per_char"] - lite["bits_per_char"]) < 1e-3
    for model in (model_dir, tflite):
        assert main(["generate", "--model", str(model), "When", "--max-tokens", "12", "--temperature", "0"]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("When") and len(out.out.rstrip("\n")) <= 4 + 12
        assert "tokens/s" in out.err
    assert main(["generate", "--model", str(tflite), "In", "--max-tokens", "30", "--seed", "3", "--top-k", "5",
                 "--top-p", "0.9", "--stop", "\n"]) == 0
    assert "\n" not in capsys.readouterr().out.rstrip("\n")
    assert main(["generate", "--model", str(model_dir), "x", "--temperature", "-1"]) == 2


@pytest.mark.parametrize("files, message", [
    ({"dev": ""}, "dev.txt: empty text"),
    ({"train": "short"}, "train.txt: 5 characters, too short for one window of 16"),
    ({"dev": None}, "dev.txt: not found"),
])
def test_bad_text_is_a_one_line_error(tmp_path, capsys, files, message):
    d = lm_dir(tmp_path, **files)
    if files.get("dev", "") is None:
        (d / "dev.txt").unlink(missing_ok=True)
    assert main(["data", "--data", str(d), *overrides(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and str(d) in err


def test_evaluate_refuses_an_empty_text(trained, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["evaluate", "--model", str(trained / "saved_models" / "verse"), "--data", str(empty)]) == 2
    assert f"{empty}: empty text" in capsys.readouterr().err


def test_compress_and_benchmark(trained, capsys):
    assert main(["compress", *overrides(trained)]) == 0
    model_dir = trained / "saved_models" / "verse"
    compression = json.loads((model_dir / "compression.json").read_text())
    variants = compression["variants"]
    assert set(variants) == {"float32", "dynamic_range", "float16", "int8", "pruned_dynamic_range"}
    assert variants["float16"]["bytes"] < variants["float32"]["bytes"]  # (the graph outweighs a tiny model)
    assert abs(variants["float32"]["dev"]["bits_per_char"] - compression["keras_dev"]["bits_per_char"]) < 1e-3
    assert "compress [4/5] int8 done" in capsys.readouterr().out
    assert main(["benchmark", *overrides(trained)]) == 0
    bench = json.loads((model_dir / "benchmark.json").read_text())
    assert bench["threads"] == 1 and set(bench["variants"]) == set(variants)
    for row in bench["variants"].values():
        assert row["time_to_first_token_ms"] > 0 and row["decode_tokens_per_second"] > 0 and row["bytes"] > 0
    assert main(["generate", "--model", str(model_dir / "tflite" / "int8.tflite"), "When", "--max-tokens", "5"]) == 0


def test_compress_builds_only_an_added_variant(trained, capsys):
    """After test_compress_and_benchmark: one more recipe in lm.variants is built alone, the others kept."""
    assert main(["compress", *overrides(trained)]) == 0
    capsys.readouterr()
    more = "lm.variants={float32: [float32], dynamic_range: [dynamic_range], float16: [float16], int8: [int8], " \
           "pruned_dynamic_range: [prune, dynamic_range], pruned_float16: [prune, float16]}"
    assert main(["compress", *overrides(trained), "--set", more]) == 0
    out = capsys.readouterr().out
    assert "compress [6/6] pruned_float16 done" in out and "int8 done" not in out
    variants = json.loads((trained / "saved_models" / "verse" / "compression.json").read_text())["variants"]
    assert list(variants) == ["float32", "dynamic_range", "float16", "int8", "pruned_dynamic_range", "pruned_float16"]
    assert variants["pruned_float16"]["sparsity"] > 0.45
