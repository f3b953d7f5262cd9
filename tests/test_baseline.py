"""The bag-of-words baseline: it learns, keeps labels.txt's column order, saves and scores a run, loads
through `pipeline evaluate`, and shows up against the Transformer in `make train` and the report."""
import json
import random

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, tiny_overrides
from pipeline.core import manifest
from pipeline.core.errors import PipelineError

LABELS = ["pos", "neg"]  # not sklearn's sorted order (neg, pos): the columns must be remapped


def toy_rows(n, seed):
    """Separable sentiment rows: one label-bearing word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_processed(d, test=True):
    """A processed run directory as the data stage writes it: {train,dev,test}.jsonl and labels.txt."""
    d.mkdir(parents=True)
    splits = {"train": toy_rows(300, 0), "dev": toy_rows(60, 1), **({"test": toy_rows(60, 2)} if test else {})}
    for split, rows in splits.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return d


def read_splits(d):
    """{split: (texts, labels)} of a processed directory, as the train stage reads it."""
    from pipeline.core.config import DataConfig
    from pipeline.text.read import read_examples

    return {p.stem: read_examples(p, DataConfig()) for p in sorted(d.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(baseline directory, run_baseline's result) on the toy processed run."""
    from pipeline.measure.baseline import run_baseline

    root = tmp_path_factory.mktemp("baseline")
    processed = write_processed(root / "processed")
    out = root / "saved_models" / "toy" / "baseline"
    return out, run_baseline(read_splits(processed), out, LABELS)


def test_make_baseline_is_the_published_recipe():
    from pipeline.measure.baseline import make_baseline

    p = make_baseline()
    words, chars = (t for _, t in p.named_steps["tfidf"].transformer_list)
    assert (words.analyzer, words.ngram_range, words.sublinear_tf) == ("word", (1, 2), True)
    assert (chars.analyzer, chars.ngram_range, chars.sublinear_tf) == ("char_wb", (2, 5), True)
    logreg = p.named_steps["logreg"]
    assert (logreg.C, logreg.max_iter) == (4, 2000)


def test_run_baseline_learns_the_toy_task_and_saves_it(fitted):
    out, result = fitted
    assert (out / "model.joblib").is_file() and (out / "labels.txt").read_text() == "pos\nneg\n"
    assert result["bytes"] == (out / "model.joblib").stat().st_size > 0
    assert 0 < result["gzip_bytes"] < result["bytes"] and result["fit_seconds"] > 0
    assert result["path"] == str(out)
    for split in ("dev", "test"):
        assert result[split]["n"] == 60 and result[split]["accuracy"] >= 0.9, split
        assert set(result[split]["per_class"]) == set(LABELS)
    assert json.loads(json.dumps(result)) == result  # goes into metrics.json as it is
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_run_baseline_without_test_split_reports_dev_only(tmp_path):
    from pipeline.measure.baseline import run_baseline

    result = run_baseline(read_splits(write_processed(tmp_path / "p", test=False)), tmp_path / "b", LABELS)
    assert "dev" in result and "test" not in result


def test_predict_proba_columns_follow_labels_txt(fitted):
    from pipeline.measure.predictors import BaselinePredictor

    out, _ = fitted
    predictor = BaselinePredictor(out)
    assert predictor.labels == LABELS and list(predictor.model.classes_) == ["neg", "pos"]
    texts = ["the movie was great and lovely", "the plot was awful and boring", "it"]
    probs = predictor.predict_proba(texts)
    assert probs.dtype == np.float32 and probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert probs[0, 0] > 0.5 and probs[1, 1] > 0.5  # column 0 is "pos", as in labels.txt
    np.testing.assert_allclose(probs, predictor.model.predict_proba(texts)[:, ::-1], atol=1e-6)
    assert predictor.predict_proba([]).shape == (0, 2)


def test_predictor_rejects_labels_that_are_not_the_models(fitted, tmp_path):
    import shutil

    from pipeline.measure.predictors import BaselinePredictor

    out, _ = fitted
    copy = tmp_path / "baseline"
    shutil.copytree(out, copy)
    (copy / "labels.txt").write_text("pos\nneutral\n")
    with pytest.raises(PipelineError, match="labels.txt"):
        BaselinePredictor(copy)
    (copy / "model.joblib").write_bytes(b"not a pickle")
    with pytest.raises(PipelineError, match="cannot load the baseline"):
        BaselinePredictor(copy)


def test_load_predictor_and_evaluate_take_a_baseline_directory(fitted, tmp_path, capsys):
    from pipeline.measure.predictors import BaselinePredictor
    from pipeline.core.config import load_config
    from pipeline.measure.predictors import load_predictor
    from pipeline.stages.evaluate import run_evaluate

    out, result = fitted
    assert isinstance(load_predictor(out), BaselinePredictor)
    held_back = tmp_path / "test.tsv"  # the user's own data, in the format `pipeline evaluate` reads
    held_back.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in toy_rows(60, 2)))
    measured = run_evaluate(load_config(None, tiny_overrides(tmp_path)), out, held_back)
    assert measured["accuracy"] == result["test"]["accuracy"] and measured["n"] == 60
    assert json.loads(capsys.readouterr().out)["accuracy"] == measured["accuracy"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="model.keras"):  # not a baseline: still a Transformer directory
        load_predictor(empty)


def test_load_predictor_refuses_an_altered_baseline_of_a_run(fitted, tmp_path):
    import shutil

    from pipeline.measure.predictors import load_predictor

    out, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(out, run / "baseline")
    manifest.record(run, "train", {"config": {}, "inputs": {}}, ["baseline"])
    (run / "baseline" / "labels.txt").write_text("pos\nneg\n\n")
    with pytest.raises(PipelineError, match="altered since the train stage wrote it"):
        load_predictor(run / "baseline")


def scores(accuracy, macro_f1):
    return {"accuracy": accuracy, "macro_f1": macro_f1}


def test_comparison_table_signs_deltas_and_names_the_winner():
    from pipeline.measure.compare import comparison_table

    worse = comparison_table({"dev": scores(0.80, 0.79), "test": scores(0.81, 0.80)},
                             {"dev": scores(0.85, 0.84), "test": scores(0.78, 0.775)})
    lines = worse.splitlines()
    assert lines[0].split()[0] == "split" and len(lines) == 5
    assert lines[1].split() == ["dev", "80.00", "85.00", "-5.00", "0.7900", "0.8400", "-0.0500"]
    assert lines[2].split() == ["test", "81.00", "78.00", "+3.00", "0.8000", "0.7750", "+0.0250"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
    assert lines[3].startswith("the bag-of-words baseline is better on dev (") and "80.00%" in lines[3]
    # a verdict per split: dev can flatter either side, so test speaks too
    assert lines[4].startswith("the Transformer beats the bag-of-words baseline on test (") and "81.00%" in lines[4]

    # better accuracy but worse macro F1 is still worse; only dev in both: one row
    mixed = comparison_table({"dev": scores(0.90, 0.70)}, {"dev": scores(0.85, 0.80), "test": scores(0.8, 0.8)})
    assert len(mixed.splitlines()) == 3 and "baseline is better on dev" in mixed
    better = comparison_table({"dev": scores(0.90, 0.89)}, {"dev": scores(0.85, 0.84)})
    assert better.splitlines()[1].split()[3] == "+5.00"
    assert "the Transformer beats the bag-of-words baseline on dev" in better and "is better" not in better


@pytest.mark.parametrize("baseline_accuracy, sentence", [
    (0.92, "The bag-of-words baseline is better on dev (accuracy: Transformer 90.00%, baseline 92.00%; "
           "macro F1: Transformer 0.9000, baseline 0.9150)"),
    (0.80, "The Transformer beats the bag-of-words baseline on dev (accuracy: Transformer 90.00%, "
           "baseline 80.00%; macro F1: Transformer 0.9000, baseline 0.7950)"),
])
def test_report_has_a_baseline_row_and_says_who_wins(tmp_path, baseline_accuracy, sentence):
    from test_benchmark import fixture_run

    from pipeline.core.config import load_config
    from pipeline.stages.report import run_report_stage

    d = fixture_run(tmp_path)
    baseline = {"dev": scores(baseline_accuracy, baseline_accuracy - 0.005), "test": scores(0.85, 0.845),
                "bytes": 3 * 1024 * 1024, "gzip_bytes": 1024 * 1024, "fit_seconds": 2.0, "path": str(d / "baseline")}
    metrics = {"dev": scores(0.9, 0.9), "test": scores(0.88, 0.88), "baseline": baseline}
    (d / "metrics.json").write_text(json.dumps(metrics))
    manifest.record(d, "train", {"config": {}, "inputs": {}}, ["labels.txt", "vocab.txt", "history.json",
                                                               "metrics.json"])
    result = run_report_stage(load_config(None, tiny_overrides(tmp_path)), "fx")
    assert result["recommended"] == "int8"  # the baseline is not a .tflite variant
    md = (d / "report.md").read_text()
    row = f"| baseline | {100 * baseline_accuracy:.2f} | {baseline_accuracy - 0.005:.4f} | 3.00 | 1.000 | – |"
    assert row in md and "| keras | 90.00 |" in md
    assert md.index(sentence) < md.index("| variant |")  # above the table
    # the run's test split speaks too (dev picked the epoch)
    assert (f"{sentence}; the Transformer beats the bag-of-words baseline on test (accuracy: Transformer 88.00%, "
            "baseline 85.00%; macro F1: Transformer 0.8800, baseline 0.8450)") in md
    html = (d / "report.html").read_text()
    assert "<td>baseline</td>" in html and sentence in html
    assert "model/metrics.json" in manifest.load(d)["stages"]["report"]["inputs"]


def test_report_without_a_baseline_has_no_baseline_row(tmp_path):
    from test_benchmark import fixture_run

    from pipeline.core.config import load_config
    from pipeline.stages.report import run_report_stage

    d = fixture_run(tmp_path)
    (d / "metrics.json").write_text(json.dumps({"dev": scores(0.9, 0.9)}))  # a run trained before the baseline
    manifest.record(d, "train", {"config": {}, "inputs": {}}, ["labels.txt", "vocab.txt", "history.json",
                                                               "metrics.json"])
    result = run_report_stage(load_config(None, tiny_overrides(tmp_path)), "fx")
    assert "baseline" not in {r["variant"] for r in result["rows"]}
    md = (d / "report.md").read_text()
    assert "| baseline |" not in md and "bag-of-words" not in md
