"""Hostile input through the CLI (one line, exit code 2, nothing written), manifest checks (refused
artifacts, staleness), a disk that fills up mid-write; the compressed run's own cases live in test_compress."""
import hashlib
import json
import os
import shutil

import pytest
from conftest import ROOT, assert_one_line_error, cli, make_toy_dir, make_toy_split, run_cli, sets, tiny_overrides

from pipeline.__main__ import main
from pipeline.core.errors import PipelineError

GOOD = b"sentence\tlabel\ngood film\t1\nbad film\t0\nfine film\t1\ndull film\t0\n"


@pytest.mark.parametrize("train, dev, needles", [
    (b"", None, ["train.tsv:1: empty file"]),
    (b"sentence\tlabel\n", None, ["train.tsv:1: header only"]),
    (b"label\n1\n", None, ["train.tsv:1: missing text column 'sentence'"]),
    (b"sentence\tscore\ngood\t1\n", None, ["train.tsv:1: missing label column 'label'"]),
    (b"sentence\tlabel\ngood\t1\nbad\t0\textra\n", None, ["train.tsv:3: expected 2 fields, found 3"]),
    (b"sentence\tlabel\ngood\t1\n \t0\n", None, ["train.tsv:3: empty text"]),
    (b"sentence\tlabel\ngood\t1\nbad\t\n", None, ["train.tsv:3: empty label"]),
    (GOOD, b"sentence\tlabel\ngood\t1\nodd\t7\n", ["dev.tsv:3: label '7' does not occur in train.tsv"]),
    (b"sentence\tlabel\ngood\t1\nfine\t1\n", None, ["train.tsv:2: only one class ('1')"]),
    (b"sentence\tlabel\ngood\t1\nbad \xe9\t0\n", None, ["train.tsv:3: invalid UTF-8"]),
    (b"sentence\tlabel\ngood\t1\nb\x00ad\t0\n", None, ["train.tsv:3: NUL byte"]),
])
def test_hostile_data_file(tmp_path, capsys, train, dev, needles):
    src = tmp_path / "d"
    src.mkdir()
    (src / "train.tsv").write_bytes(train)
    if dev is not None:
        (src / "dev.tsv").write_bytes(dev)
    code, _, err = run_cli(capsys, "data", "--data", str(src), "--run", "r", *sets(tiny_overrides(tmp_path)))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "data" / "processed").exists()  # not even a temporary directory


def test_jsonl_line_that_is_not_json(tmp_path, capsys):
    src = tmp_path / "d"
    src.mkdir()
    (src / "train.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", label: 0}\n')
    code, _, err = run_cli(capsys, "data", "--data", str(src), "--run", "r", *sets(tiny_overrides(tmp_path)))
    assert_one_line_error(code, err, "train.jsonl:2: not valid JSON")


def test_debug_shows_the_traceback(tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    (src / "train.tsv").write_bytes(b"")
    with pytest.raises(PipelineError, match="empty file"):
        main(["data", "--data", str(src), "--run", "r", "--debug", *sets(tiny_overrides(tmp_path))])


def test_crlf_bom_and_a_5_mb_line_are_accepted(tmp_path, capsys):
    src = tmp_path / "d"
    src.mkdir()
    make_toy_split(src / "train.tsv", 200, 0)
    rows = (src / "train.tsv").read_text().splitlines()
    huge = "wonderful " * 500_000  # 5 MB on one line: the tokenizer keeps only what fits seq_len
    text = "\r\n".join(rows + [f"{huge.strip()}\t1"]) + "\r\n"
    (src / "train.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, out, err = run_cli(capsys, "data", "--data", str(src), "--run", "r", *sets(tiny_overrides(tmp_path)))
    assert code == 0, err
    stats = json.loads((tmp_path / "data" / "processed" / "r" / "stats.json").read_text())
    assert stats["rows"]["train"] + stats["rows"]["dev"] == 201 and stats["text_column"] == "sentence"
    # Cut to max_seq_len x CHARS_PER_TOKEN characters before WordPiece (not 500,000 pieces), then to seq_len.
    assert stats["seq_len"] == 1024 and stats["train_token_lengths"]["max"] < 8000  # the cap, not 500,000


@pytest.mark.parametrize("yaml_text, argv, needles", [
    ("model:\n  d_model: 16\n  depth: 3\n", [], ["cfg.yaml:3: unknown key 'model.depth'"]),
    ("train:\n  epochs: three\n", [], ["cfg.yaml:2: expected int, got 'three'"]),
    ("train:\n  epochs: 2\n", ["--set", "train.epoch=3"], ["--set train.epoch=3: unknown key 'train.epoch'"]),
    ("train:\n  epochs: 2\n", ["--set", "nosuch.key=1"], ["unknown section 'nosuch'"]),
    ("train: [1, 2\n", [], ["cfg.yaml:2: invalid YAML"]),  # where the parser gave up
    ("report:\n  ship: biggest\n", [], ["cfg.yaml:2: 'report.ship' must be one of smallest, fastest, "
                                        "most_accurate, float32, dynamic_range", "got 'biggest'"]),
    ("train:\n  epochs: 2\n", ["--set", "report.ship=int4"], ["--set report.ship=int4: 'report.ship' must be"]),
])
def test_bad_config(tmp_path, capsys, yaml_text, argv, needles):
    (tmp_path / "cfg.yaml").write_text(yaml_text)
    os.chdir(tmp_path)  # the message names the config as given
    try:
        code, _, err = run_cli(capsys, "train", "--run", "r", "--config", "cfg.yaml", *argv)
    finally:
        os.chdir(ROOT)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("make, needles", [
    (lambda d: d / "nope", ["nope: not found"]),
    (lambda d: (d / "m.tflite").write_bytes(b"not a model at all") and d / "m.tflite", ["m.tflite: not a TFLite model"]),
    (lambda d: (d / "emptydir").mkdir() or d / "emptydir", ["emptydir"]),
])
def test_model_path_that_is_not_a_model(tmp_path, capsys, make, needles):
    path = make(tmp_path)
    code, _, err = run_cli(capsys, "predict", "--model", str(path), "some text")
    assert_one_line_error(code, err, *needles)


# ---------------------------------------------------------------- manifest: refusal and staleness


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data and train on the toy task through the CLI, in this process."""
    root = tmp_path_factory.mktemp("trained")
    data = make_toy_dir(root)
    overrides = sets(tiny_overrides(root))
    assert main(["data", "--data", str(data), "--run", "toy", *overrides]) == 0
    assert main(["train", "--run", "toy", *overrides]) == 0
    return root, data, overrides


def test_manifest_lists_every_artifact_with_its_checksum(trained):
    root, _, _ = trained
    model_dir = root / "saved_models" / "toy"
    m = json.loads((model_dir / "manifest.json").read_text())
    assert set(m["artifacts"]) == {"model.keras", "saved_model", "baseline", "vocab.txt", "labels.txt", "preprocess.json",
                                   "config.yaml", "history.json", "metrics.json"}
    digest = hashlib.sha256((model_dir / "metrics.json").read_bytes()).hexdigest()
    assert m["artifacts"]["metrics.json"] == {"sha256": digest, "bytes": (model_dir / "metrics.json").stat().st_size,
                                              "stage": "train"}
    train = m["stages"]["train"]
    assert train["config"]["model"]["d_model"] == 16
    processed = json.loads((root / "data" / "processed" / "toy" / "manifest.json").read_text())
    assert train["inputs"]["processed/train.tfrecord"] == processed["artifacts"]["train.tfrecord"]["sha256"]
    assert set(processed["stages"]["data"]["inputs"]) == {"train.tsv", "dev.tsv"}


def test_unchanged_inputs_skip_the_stage_and_changed_ones_rerun_it(trained, capsys, tmp_path):
    root, data, overrides = trained
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    overrides = [o.replace(str(root), str(copy)) for o in overrides]
    metrics = copy / "saved_models" / "toy" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "data", "--data", str(copy / "toy"), "--run", "toy", *overrides)
    assert code == 0 and "data: up to date" in out
    code, out, _ = run_cli(capsys, "train", "--run", "toy", *overrides, "--set", "compress.sparsity=0.5")
    assert code == 0 and "train: up to date" in out and metrics.stat().st_mtime_ns == before

    # A changed data file reruns the data stage, which makes training stale.
    with open(copy / "toy" / "dev.tsv", "a") as f:
        f.write("a great film\t1\n")
    code, out, _ = run_cli(capsys, "data", "--data", str(copy / "toy"), "--run", "toy", *overrides)
    assert code == 0 and "data: out of date (dev.tsv changed)" in out
    code, out, _ = run_cli(capsys, "train", "--run", "toy", *overrides, "--set", "train.epochs=1")
    assert code == 0 and "train: out of date (" in out and "train.epochs 3 -> 1" in out
    assert "dev.tfrecord changed" in out and metrics.stat().st_mtime_ns != before
    assert json.loads(metrics.read_text())["epochs"] == 1


@pytest.mark.parametrize("damage, word", [(lambda b: b[: len(b) // 2], "truncated"),
                                          (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "altered")])
def test_damaged_artifacts_are_refused(trained, capsys, tmp_path, damage, word):
    root, _, overrides = trained
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    overrides = [o.replace(str(root), str(copy)) for o in overrides]
    model_dir = copy / "saved_models" / "toy"
    model = model_dir / "model.keras"
    model.write_bytes(damage(model.read_bytes()))
    for argv in (["predict", "--model", str(model_dir), "good film"],
                 ["evaluate", "--model", str(model_dir), "--data", str(copy / "toy" / "dev.tsv")],
                 ["train", "--run", "toy", *overrides],
                 ["compress", "--run", "toy", *overrides]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"{model}: {word} since the train stage wrote it", "make train")
    # Processed data too: training refuses a damaged record file.
    (model_dir / "manifest.json").unlink()
    records = copy / "data" / "processed" / "toy" / "train.tfrecord"
    records.write_bytes(damage(records.read_bytes()))
    code, _, err = run_cli(capsys, "train", "--run", "toy", *overrides)
    assert_one_line_error(code, err, f"{records}: {word} since the data stage wrote it", "make data")


def test_disk_full_keeps_the_previous_artifacts(trained, tmp_path):
    """The data stage rewritten under a file-size limit (the kernel refuses the write, as on a full
    disk): it fails in one line and the previous processed run stays intact."""
    import resource

    root, _, overrides = trained
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    overrides = [o.replace(str(root), str(copy)) for o in overrides]
    processed = copy / "data" / "processed" / "toy"
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    make_toy_split(copy / "toy" / "train.tsv", 3000, 5)  # a new input: the stage must rewrite everything

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    done = cli("data", "--data", str(copy / "toy"), "--run", "toy", *overrides, preexec_fn=limit, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "File too large" in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before
    assert not [p for p in processed.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_model_file_cannot_run_code(tmp_path, capsys):
    """A .keras file whose Lambda layer would write a file when called: loading refuses it (safe mode)."""
    import tensorflow as tf

    marker = tmp_path / "pwned"
    inputs = tf.keras.Input(shape=(4,))
    touch = eval(f'lambda x: x + len(open({str(marker)!r}, "w").name) * 0')  # the path inside the code
    outputs = tf.keras.layers.Lambda(touch)(inputs)
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    tf.keras.Model(inputs, outputs).save(model_dir / "model.keras")
    marker.unlink()  # saving traced the lambda once
    (model_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ngood\n")
    (model_dir / "labels.txt").write_text("0\n1\n")
    (model_dir / "preprocess.json").write_text('{"seq_len": 8}')
    code, _, err = run_cli(capsys, "predict", "--model", str(model_dir), "good")
    assert_one_line_error(code, err, "model.keras: cannot load the model", "Lambda")
    assert not marker.exists()
