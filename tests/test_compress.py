"""Compression stage on a tiny trained model: every variant, sparsity, QAT closeness, parity, resume, a kill
mid-step, a damaged file; and the benchmark of it. Every user of the compressed run is here, so it is built once."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (COMPRESS, ROOT, assert_one_line_error, cli, make_toy_dir, make_vectors_file, run_cli, sets,
                      sigkill, tiny_overrides)

from pipeline.core import manifest
from pipeline.core.config import DEFAULT_VARIANTS, FINE_TUNED_VARIANTS

# Every recipe: the defaults and those that fine-tune while compressing
ALL_VARIANTS = {**DEFAULT_VARIANTS, **FINE_TUNED_VARIANTS}
BUILT = [n for n, steps in ALL_VARIANTS.items() if steps[0] != "student"]  # the toy run has no student
RUN = ["train.epochs=6", *COMPRESS, f"compress.variants={json.dumps(ALL_VARIANTS)}"]  # beside tiny_overrides' paths


def run_overrides(root, cfg):
    """tiny_overrides for a copy of the compressed run under `root` (the same word vectors file)."""
    return tiny_overrides(root, *RUN, f"data.word_vectors={cfg.data.word_vectors}")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(config, model directory, summary) after data, train and compress on the toy task."""
    from pipeline.stages.compress import run_compress_stage
    from pipeline.core.config import load_config
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    root = tmp_path_factory.mktemp("compress")
    data = make_toy_dir(root)
    vectors = make_vectors_file(root / "vectors.txt")  # every variant carries them
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(root, *RUN, f"data.word_vectors={vectors}"))
    run_data_stage(cfg, str(data), "toy")
    run_train_stage(cfg, "toy")
    summary = run_compress_stage(cfg, "toy")
    return cfg, root / "saved_models" / "toy", summary


def test_every_variant_exists_loads_and_predicts(compressed):
    from pipeline.measure.predictors import load_predictor

    _, model_dir, summary = compressed
    # the last two words are not in the toy data: only their word vectors say what they mean
    texts = ["the movie was great", "the movie was awful", "the movie was splendid", "the movie was dreadful"]
    for name in BUILT:
        predictor = load_predictor(model_dir / "tflite" / f"{name}.tflite")  # LiteRT
        probs = predictor.predict_proba(texts)
        assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=0.02), name
        assert [predictor.labels[i] for i in probs.argmax(1)] == ["1", "0", "1", "0"], name
        assert set(predictor.inputs) == {"input_word_ids", "input_mask", "input_type_ids"}
        assert all(d["dtype"] == np.int32 for d in predictor.inputs.values())
    assert list(summary["variants"]) == list(BUILT)


def test_compression_json_lists_every_variant(compressed):
    cfg, model_dir, summary = compressed
    on_disk = json.loads((model_dir / "compression.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    keras_accuracy = on_disk["keras"]["accuracy"]
    assert keras_accuracy > 0.9
    for name, v in on_disk["variants"].items():
        path = Path(v["path"])
        assert path.is_file() and v["bytes"] == path.stat().st_size
        assert 0 < v["gzip_bytes"] < v["bytes"]
        assert v["accuracy_change"] == pytest.approx(v["accuracy"] - keras_accuracy)
        assert 0.0 <= v["sparsity"] <= 1.0 and 0.0 <= v["macro_f1"] <= 1.0
        assert v["dev"]["n"] == 80
    variants = on_disk["variants"]
    assert variants["int8"]["bytes"] < variants["float32"]["bytes"] and variants["float16"]["bytes"] < variants["float32"]["bytes"]
    assert [v["recipe"] for v in variants.values()] == [cfg.compress.variants[n] for n in variants]
    assert list((model_dir.parent.parent / "runs" / "toy" / "compress").glob("events.out.tfevents.*"))


def test_pruning_reaches_target_sparsity_and_it_survives_quantization(compressed):
    _, model_dir, summary = compressed
    kernels = summary["pruned_kernel_sparsity"]
    # the embedding + 7 kernels of the one encoder block (conv, q, k, v, o, ff1, ff2)
    assert {"embedding/embeddings", "encoder_0/conv_kernel", "encoder_0/ff1_kernel"} <= set(kernels) and len(kernels) == 8
    assert all(s == pytest.approx(0.75, abs=0.01) for s in kernels.values()), kernels
    variants = summary["variants"]
    for name in ("pruned_int8", "pruned_qat_int8"):
        assert variants[name]["sparsity"] > 0.7, name  # zeros that ship in the .tflite weights
    for name in ("float32", "int8", "qat_int8"):  # zeros of their own: unseen words' embeddings, empty vector rows
        assert variants[name]["sparsity"] < variants["pruned_int8"]["sparsity"] - 0.3, name
    # tiny: headers and the (unpruned) word-vector table dominate
    assert variants["pruned_qat_int8"]["gzip_bytes"] < 0.95 * variants["qat_int8"]["gzip_bytes"]
    clusters = summary["step_stats"]["prune+cluster"]  # distinct values per pruned kernel after clustering
    assert set(clusters) == set(kernels) and all(n <= 16 + 1 for n in clusters.values()), clusters  # + zero
    assert variants["clustered_qat_int8"]["sparsity"] > 0.7
    assert list((model_dir.parent.parent / "runs" / "toy" / "prune").rglob("events.out.tfevents.*"))


def test_rerun_resumes_without_redoing_steps(compressed, capsys):
    from pipeline.stages.compress import run_compress_stage

    cfg, model_dir, summary = compressed
    before = {p.name: p.stat().st_mtime_ns for p in (model_dir / "tflite").iterdir()}
    assert run_compress_stage(cfg, "toy")["variants"] == json.loads(json.dumps(summary["variants"]))
    assert "compress: up to date" in capsys.readouterr().out  # finished and unchanged: nothing redone

    # As if killed while evaluating qat_int8: the stage is not listed as finished, that step not done.
    manifest.begin(model_dir, "compress")
    (model_dir / "compress_state" / "qat_int8.eval.done").unlink()
    again = run_compress_stage(cfg, "toy")
    out = capsys.readouterr().out
    assert "resuming" in out and "qat_int8.eval done" in out and "prune done" not in out
    assert {p.name: p.stat().st_mtime_ns for p in (model_dir / "tflite").iterdir()} == before
    assert again["variants"] == json.loads(json.dumps(summary["variants"]))


def test_a_run_compressed_by_an_older_stage_is_not_up_to_date(compressed, monkeypatch, capsys):
    from pipeline.stages import compress
    from pipeline.text.processed import load_processed

    cfg, model_dir, _ = compressed
    processed = load_processed(cfg, "toy")[0]
    assert manifest.up_to_date(model_dir, "compress", compress.stage_key(cfg, model_dir, processed))
    monkeypatch.setattr(compress, "STAGE_VERSION", compress.STAGE_VERSION + 1)
    assert not manifest.up_to_date(model_dir, "compress", compress.stage_key(cfg, model_dir, processed))
    assert f"compress_stage.version {compress.STAGE_VERSION - 1} -> {compress.STAGE_VERSION}" in capsys.readouterr().out


@pytest.mark.e2e  # copies the compressed run and rebuilds a variant: ~40 s
def test_changing_the_recipe_list_rebuilds_only_the_changed_variants(compressed, tmp_path, capsys):
    import copy
    import shutil

    from pipeline.stages.compress import run_compress_stage

    cfg, model_dir, summary = compressed
    root = model_dir.parent.parent
    shutil.copytree(root, tmp_path / "copy")
    cfg = copy.deepcopy(cfg)
    for section in ("data", "models", "runs"):
        setattr(cfg.paths, section, str(tmp_path / "copy" / Path(getattr(cfg.paths, section)).relative_to(root)))
    model_dir = Path(cfg.paths.models) / "toy"
    before = {p.name: p.stat().st_mtime_ns for p in (model_dir / "tflite").iterdir()}
    cfg.compress.variants = {"float32": ["float32"], "pruned_int8": ["prune", "int8"], "qat_int8": ["prune", "qat", "int8"]}
    again = run_compress_stage(cfg, "toy")
    out = capsys.readouterr().out
    assert "resuming" in out and "qat_int8 done" in out and "prune done" not in out and "pruned_int8 done" not in out
    after = {p.name: p.stat().st_mtime_ns for p in (model_dir / "tflite").iterdir()}
    assert set(after) == {"float32.tflite", "pruned_int8.tflite", "qat_int8.tflite"}
    assert after["pruned_int8.tflite"] == before["pruned_int8.tflite"] != after["qat_int8.tflite"]
    assert again["variants"]["pruned_int8"] == json.loads(json.dumps(summary["variants"]["pruned_int8"]))
    assert again["variants"]["qat_int8"]["recipe"] == ["prune", "qat", "int8"]


def test_fine_tuning_weighs_each_row_by_its_class_as_training_does(tmp_path):
    from pipeline.export.recipes import fine_tune_data as _fine_tune_data
    from pipeline.core.config import load_config
    from pipeline.stages.data import run_data_stage
    from pipeline.text.processed import load_processed

    data = make_toy_dir(tmp_path)
    rows = (data / "train.tsv").read_text().splitlines()
    kept = [r for i, r in enumerate(rows[1:]) if r.endswith("\t1") or i % 6 == 0]  # 200 positives, 67 negatives
    (data / "train.tsv").write_text("\n".join([rows[0], *kept]) + "\n")
    for setting, expected in (("balanced", None), ("none", 1.0)):
        cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path / setting, f"train.class_weight={setting}"))
        run_data_stage(cfg, str(data), "toy")
        processed, stats, labels = load_processed(cfg, "toy")
        counts = [stats["class_counts"]["train"][label] for label in labels]
        assert counts == [67, 200]
        for batch in _fine_tune_data(cfg, processed, int(stats["seq_len"]), stats, labels).take(3):
            y = batch[1].numpy().argmax(1)
            weights = batch[2].numpy() if len(batch) == 3 else np.ones(len(y))
            # each class weighs n / (classes * its count) in the loss, as in training
            want = np.where(y == 0, 267 / 134, 267 / 400) if expected is None else np.full(len(y), expected)
            assert np.allclose(weights, want), setting


def test_qat_output_stays_close_to_float_and_keeps_zeros():
    import tensorflow as tf

    from pipeline.export.convert import export_tflite
    from pipeline.measure.tflite_file import tflite_weight_sparsity
    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model
    from pipeline.model.quantize import quantize_model

    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(d_model=32, num_layers=1, num_heads=2, ff_dim=64, dropout=0.0, ngram_order=3), 1000, 2, 16)
    rng = np.random.default_rng(0)
    weights = [np.where(rng.random(w.shape) < 0.8, 0.0, w).astype(w.dtype) if w.ndim == 2 else w
               for w in model.get_weights()]
    model.set_weights(weights)
    ids = rng.integers(1, 1000, size=(8, 16)).astype(np.int32)
    inputs = {"input_word_ids": ids, "input_mask": np.ones_like(ids), "input_type_ids": np.zeros_like(ids)}
    qat = quantize_model(model, preserve_sparsity=True)
    qat(inputs, training=True)  # one pass in training mode sets the activation ranges
    assert np.max(np.abs(qat(inputs, training=False) - model(inputs, training=False))) < 0.05
    content = export_tflite(qat, 16, "int8", lambda: ({k: v[i:i + 1] for k, v in inputs.items()} for i in range(8)))
    assert tflite_weight_sparsity(content) > 0.75


def test_parity_check_catches_a_different_model(compressed):
    from pipeline.export.parity import check_parity
    from pipeline.core.errors import PipelineError
    from pipeline.measure.predictors import load_predictor

    _, model_dir, _ = compressed
    # with two texts without a sentiment word: the others' probabilities are 0 and 1 in every variant
    texts = ["the movie was great", "a dull plot", "it was very funny", "ugly and boring", "the movie was",
             "a film and the actors"]
    keras = load_predictor(model_dir).predict_proba(texts)
    assert check_parity(keras, load_predictor(model_dir / "tflite" / "float32.tflite").predict_proba(texts),
                        1e-4, "float32.tflite") <= 1e-4
    other = load_predictor(model_dir / "tflite" / "pruned_int8.tflite").predict_proba(texts)
    with pytest.raises(PipelineError, match="parity check failed"):
        check_parity(keras, other, 1e-4, "pruned_int8.tflite")
    flipped = keras[:, ::-1]
    with pytest.raises(PipelineError, match="6 different predictions"):
        check_parity(keras, flipped, 1e-4, "x.tflite")


def test_mediapipe_runs_every_variant_like_litert(compressed, capsys):
    from pipeline.stages.evaluate import run_predict

    cfg, model_dir, summary = compressed
    for name, v in summary["variants"].items():
        assert v["mediapipe"]["agreement"] == 1.0 and v["mediapipe"]["accuracy"] == v["accuracy"], name
    path = model_dir / "tflite" / "int8.tflite"
    texts = ["the movie was great", "a dull and boring plot"]
    litert = run_predict(cfg, path, texts)
    mediapipe = run_predict(cfg, path, texts, runtime="mediapipe")
    assert [r["label"] for r in mediapipe] == [r["label"] for r in litert] == ["1", "0"]
    for a, b in zip(litert, mediapipe):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3)
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_damaged_tflite_is_refused_by_predict_and_benchmark(compressed, capsys, tmp_path):
    cfg, model_dir, _ = compressed
    root = model_dir.parents[1]
    copy = tmp_path / "copy"
    shutil.copytree(root / "saved_models", copy / "saved_models")
    shutil.copytree(root / "data", copy / "data")
    tflite = copy / "saved_models" / "toy" / "tflite" / "int8.tflite"
    content = tflite.read_bytes()
    tflite.write_bytes(content[: len(content) - 100])
    code, _, err = run_cli(capsys, "predict", "--model", str(tflite), "good film")
    assert_one_line_error(code, err, f"{tflite}: truncated since the compress stage wrote it")
    code, _, err = run_cli(capsys, "benchmark", "--run", "toy", *sets(run_overrides(copy, cfg)))
    assert_one_line_error(code, err, f"{tflite}: truncated", "make compress")


@pytest.mark.e2e
def test_sigkill_compress_mid_step_then_rerun_gives_the_same_files(compressed, tmp_path):
    """With the last fine-tuning step (prune-preserving QAT) and the evaluations left to do, the stage is
    killed 3 s into its resumed run (while it loads, or inside the step), and a second run finishes it:
    every file equals the uninterrupted run's, byte for byte."""
    cfg, model_dir, _ = compressed
    root = model_dir.parents[1]
    copy = tmp_path / "copy"
    shutil.copytree(root / "data", copy / "data")
    shutil.copytree(model_dir, copy / "saved_models" / "toy",
                    ignore=shutil.ignore_patterns("compression.json", "benchmark.json", "report*", "mobile",
                                                  "pruned_qat_int8.*", "*.eval.*"))
    manifest.begin(copy / "saved_models" / "toy", "compress")  # what a killed run leaves listed
    overrides = sets(run_overrides(copy, cfg))
    state = copy / "saved_models" / "toy" / "compress_state"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compress", "--run", "toy", *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the step starts right after the stage says it resumes
        if "resuming compression" in line:
            break
    time.sleep(3.0)
    sigkill(proc, "compress finished before it could be killed")
    assert not (copy / "saved_models" / "toy" / "compression.json").exists()
    assert not (state / "pruned_qat_int8.done").exists()

    again = cli("compress", "--run", "toy", *overrides, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pruned_qat_int8 done" in again.stdout and "] qat_int8 done" not in again.stdout
    for name in ("float32", "int8", "pruned_int8", "qat_int8", "pruned_qat_int8"):
        resumed = (copy / "saved_models" / "toy" / "tflite" / f"{name}.tflite").read_bytes()
        assert resumed == (model_dir / "tflite" / f"{name}.tflite").read_bytes(), name
    assert manifest.load(copy / "saved_models" / "toy")["stages"]["compress"]


@pytest.fixture(scope="module")
def benchmark(compressed):
    from pipeline.stages.benchmark import run_benchmark_stage

    cfg, model_dir, _ = compressed
    result = run_benchmark_stage(cfg, "toy")
    return model_dir, result


@pytest.mark.e2e  # at least 200 timed runs of every variant at two thread counts: ~60 s
def test_benchmark_writes_positive_measurements_for_every_variant(benchmark):

    model_dir, result = benchmark
    assert json.loads((model_dir / "benchmark.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["variants"]) == {"keras", *BUILT}
    for name, v in result["variants"].items():
        settings = ["threads_all"] if name == "keras" else ["threads_1", "threads_2"]
        assert sorted(v["latency"]) == settings, name
        for lat in v["latency"].values():
            assert lat["runs"] >= 200
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"], name
            assert any(k.endswith("_per_1000") and x >= 0 for k, x in lat.items())
        assert v["load_ms"] > 0 and v["throughput_examples_per_s"] > 0 and v["bytes"] > 0
        assert v["peak_rss_kb"] >= v["rss_before_load_kb"] > 0
    for name in BUILT:
        ops = result["variants"][name]["ops"]
        assert ops["xnnpack_partitions"] >= 1 and sum(ops["delegated"].values()) > 0
        assert result["variants"][name]["matmul_flops"] > 0
        # int8 with compress.float_ops in float32: as few partitions as float32 itself
        if name.endswith("int8"):
            assert ops["xnnpack_partitions"] == result["variants"]["float32"]["ops"]["xnnpack_partitions"], name
    assert result["variants"]["lowrank_int8"]["matmul_flops"] <= result["variants"]["int8"]["matmul_flops"]
    assert result["forward_flops_per_example"] > 0 and result["params"] > 0
    training = result["training"]
    for key in ("padded", "bucketed"):
        assert training[key]["examples_per_s"] > 0 and training[key]["epoch_seconds"] > 0
    assert 0 < training["padded_fraction_of_peak"] < 1
    assert result["ratios"]["int8_over_float32_p50_1thread"] > 0
    dense = result["dense_only"]
    assert all(dense[m]["runs"] >= 200 and dense[m]["p50_ms"] > 0 for m in ("float32", "int8"))
    assert result["ratios"]["dense_only_int8_over_float32_p50_1thread"] == dense["int8"]["p50_ms"] / dense["float32"]["p50_ms"]


def test_fine_tuning_steps_are_capped_by_the_training_step_limit():
    from pipeline.export.recipes import fine_tune_steps as _steps
    from pipeline.core.config import load_config

    cfg = load_config(ROOT / "params.yaml", ["train.batch_size=32", "train.max_steps=0", "train.max_tokens=0"])
    assert _steps(cfg, 64_000, 20.0, 2.0) == 4000 and _steps(cfg, 10, 20.0, 0.1) == 1
    cfg = load_config(ROOT / "params.yaml", ["train.batch_size=32", "train.max_steps=1000", "train.max_tokens=0"])
    assert _steps(cfg, 64_000, 20.0, 2.0) == 1000 and _steps(cfg, 3200, 20.0, 2.0) == 200
    # long texts: 320,000 wordpieces are 100 steps of 32 texts of 100
    cfg = load_config(ROOT / "params.yaml", ["train.batch_size=32", "train.max_steps=1000", "train.max_tokens=320000"])
    assert _steps(cfg, 3200, 100.0, 2.0) == 100 and _steps(cfg, 3200, 10.0, 2.0) == 200


def test_a_students_chain_prunes_and_fine_tunes_at_the_student_settings():
    from pipeline.export.recipes import chain_config
    from pipeline.core.config import load_config

    cfg = load_config(ROOT / "params.yaml", ["compress.sparsity=0.8", "compress.student_sparsity=0.5",
                                             "compress.learning_rate=2e-5", "compress.student_learning_rate=2e-4"])
    assert chain_config(cfg, ("prune", "prune_qat")) is cfg
    student = chain_config(cfg, ("student", "prune")).compress
    assert (student.sparsity, student.learning_rate, student.clusters) == (0.5, 2e-4, cfg.compress.clusters)
    assert cfg.compress.sparsity == 0.8  # the run's config is left as it was
