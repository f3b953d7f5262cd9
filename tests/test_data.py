"""Tests of the data stage (pipeline/stages/data.py) and pipeline/text/: readers, validation, splits, input
pipeline, download."""
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (before TensorFlow: tf.keras must be tf-keras)
import tensorflow as tf

from pipeline.stages import data as D
from pipeline.text import dataset, processed, read, splits, sst2
from pipeline.core.config import Config, DataConfig
from pipeline.core.errors import PipelineError

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
POS = ["a great movie", "wonderful and moving", "great fun", "a moving story", "wonderful acting"]
NEG = ["a dull movie", "boring and slow", "dull fun", "a slow story", "boring acting"]


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def tsv(rows, header=("sentence", "label")):
    lines = ["\t".join(header)] if header else []
    return "".join(f"{line}\n" for line in lines + ["\t".join(map(str, r)) for r in rows])


def sample_rows(n_per_class=12, labels=("pos", "neg")):
    rows = []
    for i in range(n_per_class):
        rows.append((f"{POS[i % len(POS)]} {i}", labels[0]))
        rows.append((f"{NEG[i % len(NEG)]} {i}", labels[1]))
    return rows


def make_cfg(tmp_path, **data):
    cfg = Config()
    cfg.paths.data = str(tmp_path / "out")
    cfg.model.backbone = "none"  # a learned vocabulary (the backbone's is tested in test_backbone.py)
    cfg.data = DataConfig(**{"vocab_size": 300, "word_vectors": "none", **data})
    return cfg


# ------------------------------------------------------------------------------ readers

def test_read_tsv_with_and_without_header(tmp_path):
    cfg = DataConfig()
    rows = [("a good film", 1), ('she said "wow"', 0)]  # TSV quotes are ordinary characters
    with_header = write(tmp_path / "a.tsv", tsv(rows))
    without = write(tmp_path / "b.tsv", tsv(rows, header=None))
    for path in (with_header, without):
        assert read.read_examples(path, cfg) == (["a good film", 'she said "wow"'], ["1", "0"])


def test_read_header_in_any_order_with_extra_columns_and_text_fallback(tmp_path):
    path = write(tmp_path / "t.tsv", "id\tlabel\ttext\n7\tpos\tnice one\n8\tneg\tbad one\n")
    assert read.read_examples(path, DataConfig()) == (["nice one", "bad one"], ["pos", "neg"])


def test_read_csv_quoted_fields(tmp_path):
    path = write(tmp_path / "t.csv", 'sentence,label\n"good, really good",pos\n"two\nlines",neg\nplain,pos\n')
    texts, labels = read.read_examples(path, DataConfig())
    assert texts == ["good, really good", "two\nlines", "plain"]
    assert labels == ["pos", "neg", "pos"]


def test_read_jsonl_int_and_string_labels(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "good", "label": 1}\n\n{"sentence": "bad", "label": " neg "}\n')
    assert read.read_examples(path, DataConfig()) == (["good", "bad"], ["1", "neg"])


def test_bom_and_crlf_accepted(tmp_path):
    path = write(tmp_path / "t.tsv", b"\xef\xbb\xbfsentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n")
    assert read.read_examples(path, DataConfig()) == (["good film", "bad film"], ["1", "0"])
    path = write(tmp_path / "t.csv", b'\xef\xbb\xbftext,label\r\n"a, b",1\r\nc,0\r\n')
    assert read.read_examples(path, DataConfig()) == (["a, b", "c"], ["1", "0"])


def test_single_column_file_has_no_labels(tmp_path):
    path = write(tmp_path / "t.tsv", "just text\nmore text\n")
    assert read.read_examples(path, DataConfig(), require_labels=False) == (["just text", "more text"], [])
    with pytest.raises(PipelineError, match=r"t\.tsv:1: one column and no header"):
        read.read_examples(path, DataConfig())


def test_long_line_is_read(tmp_path):
    big = "word " * 200_000  # 1 MB field: over csv's default field size limit
    path = write(tmp_path / "t.tsv", f"sentence\tlabel\n{big}\t1\nshort\t0\n")
    texts, _ = read.read_examples(path, DataConfig())
    assert len(texts[0]) == len(big.strip())


# Files as users write them: other column names, no header, labels first, extra columns.
REVIEWS = [("I loved this movie, it was great fun", "pos"), ("Terrible acting and a dull plot", "neg"),
           ("A moving story, well told", "pos"), ("Boring from start to end", "neg"),
           ("Clever, warm and funny", "pos"), ("Two hours I will never get back", "neg")]
NEWS = [("World", "Leaders meet in Geneva to talk about trade"), ("Sports", "Home side wins the cup after extra time"),
        ("Business", "Oil prices rise for a third day"), ("World", "Floods hit the coast, thousands leave"),
        ("Sports", "Star striker signs for a record fee"), ("Business", "Shares fall as rates go up")]


def test_csv_header_with_other_column_names_is_a_header(tmp_path, capsys):
    path = write(tmp_path / "review.csv", "review,sentiment\n" + "".join(f'"{t}",{l}\n' for t, l in REVIEWS))
    out = read.read_table(path, DataConfig())
    assert out["texts"] == [t for t, _ in REVIEWS] and out["labels"] == [l for _, l in REVIEWS]
    assert out["lines"][0] == 2 and (out["text_column"], out["label_column"]) == ("review", "sentiment")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("reading review.csv: text column 'review', label column 'sentiment' (chosen by "
                                     "content; set data.text_column/data.label_column to override)") in err


def test_label_first_headerless_tsv_with_string_labels(tmp_path, capsys):
    path = write(tmp_path / "news.tsv", tsv(NEWS, header=None))
    assert read.read_examples(path, DataConfig()) == ([t for _, t in NEWS], [l for l, _ in NEWS])
    assert "text column 'column 2', label column 'column 1'" in capsys.readouterr().err


def test_headerless_text_label_tsv_keeps_its_first_row(tmp_path):
    # A short first text and a word label look like names, but "pos" recurs below: an example.
    rows = [("great fun", "pos"), ("a dull and slow plot", "neg"), ("wonderful acting", "pos"), ("boring", "neg")]
    path = write(tmp_path / "t.tsv", tsv(rows, header=None))
    assert read.read_examples(path, DataConfig()) == ([t for t, _ in rows], [l for _, l in rows])


def test_header_with_configured_names(tmp_path, capsys):
    cfg = DataConfig(text_column="review", label_column="sentiment")
    path = write(tmp_path / "t.csv", "sentiment,id,review\npos,1,great fun\nneg,2,dull\n")  # too short to judge
    assert read.read_examples(path, cfg) == (["great fun", "dull"], ["pos", "neg"])
    assert "chosen by content" not in capsys.readouterr().err  # nothing was guessed


def test_csv_with_four_columns_picks_text_and_label_by_content(tmp_path, capsys):
    rows = [(i, f"Title {i}", t, 1 + i % 3) for i, (t, _) in enumerate(REVIEWS)]
    body = "".join(f'{i},{title},"{t}",{r}\n' for i, title, t, r in rows)
    expected = ([t for _, _, t, _ in rows], [str(r) for *_, r in rows])
    path = write(tmp_path / "h.csv", "id,title,review,rating\n" + body)
    assert read.read_examples(path, DataConfig()) == expected
    assert "text column 'review', label column 'rating'" in capsys.readouterr().err
    path = write(tmp_path / "n.csv", body)  # the same without a header: chosen by content all the same
    assert read.read_examples(path, DataConfig()) == expected
    assert "text column 'column 3', label column 'column 4'" in capsys.readouterr().err


def test_one_column_header_is_found_by_text_length(tmp_path):
    texts = [t for t, _ in REVIEWS]
    path = write(tmp_path / "t.csv", "review\n" + "".join(f'"{t}"\n' for t in texts))
    assert read.read_examples(path, DataConfig(), require_labels=False) == (texts, [])
    path = write(tmp_path / "u.csv", "".join(f'"{t}"\n' for t in texts))
    assert read.read_examples(path, DataConfig(), require_labels=False) == (texts, [])


def test_jsonl_with_other_keys(tmp_path, capsys):
    path = write(tmp_path / "t.jsonl", "".join(json.dumps({"id": i, "review": t, "sentiment": l}) + "\n"
                                               for i, (t, l) in enumerate(REVIEWS)))
    out = read.read_table(path, DataConfig())
    assert out["texts"] == [t for t, _ in REVIEWS] and out["labels"] == [l for _, l in REVIEWS]
    assert "text column 'review', label column 'sentiment'" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, where, problem", [
    ("train.tsv", b"", 1, "empty file"),
    ("train.tsv", b"\n\n", 1, "empty file"),
    ("train.tsv", b"sentence\tlabel\n", 1, "header only"),
    ("train.tsv", b"label\n1\n", 1, "missing text column 'sentence'"),
    ("train.csv", b"sentence,score\nfine,1\n", 1, "missing label column 'label'"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\n  \t0\n", 3, "empty text"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\nbad\t \n", 3, "empty label"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\nbad \xff\t0\n", 3, "invalid UTF-8"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\nbad\t0\textra\n", 3, "expected 2 fields, found 3"),
    ("dev.tsv", b"good\t1\nbad\n", 2, "expected 2 fields, found 1"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\nb\x00ad\t0\n", 3, "NUL byte"),
    ("dev.tsv", "sentence\tlabel\n".encode("utf-16"), 1, "NUL byte"),
    ("dev.csv", b'text,label\n"a\nb",1\n,0\n', 4, "empty text"),  # line numbers count physical lines
    ("t.jsonl", b'{"text": "a", "label": 1}\n{oops\n', 2, "not valid JSON"),
    ("t.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', 2, "expected a JSON object"),
    ("t.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "b"}\n', 3, "missing label field"),
    ("t.jsonl", b'{"text": "a", "label": 1}\n{"label": 1}\n', 2, "missing text field"),
    ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": [1]}\n', 2, "label must be"),
])
def test_validation_errors_name_file_and_line(tmp_path, name, content, where, problem):
    path = write(tmp_path / name, content)
    with pytest.raises(PipelineError) as e:
        read.read_examples(path, DataConfig())
    msg = str(e.value)
    assert msg.startswith(f"{name}:{where}: "), msg
    assert problem in msg and "\n" not in msg


def test_duplicates_and_imbalance_warn_but_do_not_fail(tmp_path, capsys):
    rows = [("good", 1)] * 2 + [(f"fine {i}", 1) for i in range(8)] + [("bad", 0), ("good", 0)]
    path = write(tmp_path / "t.tsv", tsv(rows))
    texts, labels = read.read_examples(path, DataConfig())
    assert len(texts) == 12
    err = capsys.readouterr().err
    assert "t.tsv: 2 duplicate texts, 1 of them with a different label (e.g. line 3 repeats line 2)" in err
    assert "class imbalance (1: 10, 0: 2)" in err


# ------------------------------------------------------------------------------ splits

def test_find_splits_errors(tmp_path):
    with pytest.raises(PipelineError, match="no train.tsv, train.csv or train.jsonl"):
        splits.find_splits(write(tmp_path / "d" / "dev.tsv", "x\t1\n").parent)
    write(tmp_path / "d" / "train.tsv", "x\t1\n")
    write(tmp_path / "d" / "dev.jsonl", "{}\n")
    with pytest.raises(PipelineError, match="both dev.tsv and dev.jsonl"):
        splits.find_splits(tmp_path / "d")


def test_label_order():
    assert splits.sort_labels(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert splits.sort_labels(["pos", "neg", "10"]) == ["10", "neg", "pos"]


def test_stratified_split_is_deterministic_and_keeps_ratio():
    labels = ["a"] * 80 + ["b"] * 20
    keep, held = splits.stratified_split(labels, 0.1, seed=1)
    keep2, held2 = splits.stratified_split(labels, 0.1, seed=1)
    assert (held == held2).all() and (keep == keep2).all()
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    assert [labels[i] for i in held].count("a") == 8 and [labels[i] for i in held].count("b") == 2
    _, other = splits.stratified_split(labels, 0.1, seed=2)
    assert set(other.tolist()) != set(held.tolist())


# ------------------------------------------------------------------------------ data stage

def read_tfrecord(path):
    out = []
    for rec in tf.data.TFRecordDataset(str(path)):
        ex = tf.train.Example.FromString(rec.numpy())
        out.append((list(ex.features.feature["input_word_ids"].int64_list.value),
                    ex.features.feature["label"].int64_list.value[0]))
    return out


def test_run_data_stage_writes_everything(tmp_path, capsys):
    src = tmp_path / "mydata"
    write(src / "train.tsv", tsv(sample_rows(30)))
    write(src / "dev.csv", "text,label\nwonderful story,pos\n\"dull, slow\",neg\n")
    write(src / "test.jsonl", '{"text": "a great story", "label": "pos"}\n')
    cfg = make_cfg(tmp_path)
    stats = D.run_data_stage(cfg, str(src), "myrun")
    out = tmp_path / "out" / "processed" / "myrun"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "vocab.txt", "labels.txt", "train.tfrecord", "dev.tfrecord", "test.tfrecord",
        "train.jsonl", "dev.jsonl", "test.jsonl", "stats.json", "manifest.json"])
    assert json.loads((out / "stats.json").read_text()) == stats
    assert processed.load_labels(out) == ["neg", "pos"]
    vocab = (out / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and stats["vocab_size"] == len(vocab)
    assert stats["rows"] == {"train": 60, "dev": 2, "test": 1}
    assert stats["class_counts"]["train"] == {"neg": 30, "pos": 30}
    assert 8 <= stats["seq_len"] <= 128 and stats["seq_len"] >= stats["train_token_lengths"]["p50"]

    train = read_tfrecord(out / "train.tfrecord")
    assert len(train) == 60 and [label for _, label in train[:2]] == [1, 0]  # pos=1, neg=0, file order
    for ids, _ in train:
        assert ids[0] == 2 and ids[-1] == 3 and 0 not in ids and len(ids) <= stats["seq_len"]
    # "," never occurs in train: [UNK], one of the 5 dev wordpieces.
    assert [vocab[i] for i in read_tfrecord(out / "dev.tfrecord")[1][0]] == ["[CLS]", "dull", "[UNK]", "slow", "[SEP]"]
    assert stats["oov_rate"]["dev"] == 0.2 and stats["oov_rate"]["train"] == 0.0
    # dev.jsonl carries the raw text for text-level runtimes, and read_examples reads it back.
    assert read.read_examples(out / "dev.jsonl", cfg.data) == (["wonderful story", "dull, slow"], ["pos", "neg"])
    assert read.read_examples(out / "train.jsonl", cfg.data) == read.read_examples(src / "train.tsv", cfg.data)
    printed = capsys.readouterr().out
    assert "train 60, dev 2, test 1" in printed and f"seq_len: {stats['seq_len']}" in printed


def test_hold_out_dev_when_missing_and_seq_len_cap(tmp_path):
    src = tmp_path / "d"
    rows = sample_rows(20) + [("great " * 40, "pos")]
    write(src / "train.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    cfg = make_cfg(tmp_path, dev_fraction=0.25, max_seq_len=8, length_percentile=100.0)
    stats = D.run_data_stage(cfg, str(src), "r")
    out = tmp_path / "out" / "processed" / "r"
    assert stats["rows"] == {"train": 31, "dev": 10}
    assert stats["class_counts"]["dev"] == {"neg": 5, "pos": 5}
    assert "hold-out" in stats["files"]["dev"]
    dev_texts, _ = read.read_examples(out / "dev.jsonl", cfg.data)
    assert len(set(dev_texts)) == 10 and set(dev_texts) <= {t.strip() for t, _ in rows}
    train_texts, _ = read.read_examples(out / "train.jsonl", cfg.data)  # what was trained on: the rest
    assert len(train_texts) == 31 and sorted(train_texts + dev_texts) == sorted(t.strip() for t, _ in rows)
    assert stats["seq_len"] == 8 and stats["train_token_lengths"]["max"] > 8
    assert stats["truncated_fraction"]["train"] > 0
    assert all(len(ids) <= 8 and ids[-1] == 3 for ids, _ in read_tfrecord(out / "train.tfrecord"))
    # Same seed, same hold-out.
    D.run_data_stage(cfg, str(src), "r2")
    assert (out / "dev.jsonl").read_text() == (tmp_path / "out" / "processed" / "r2" / "dev.jsonl").read_text()


def test_invalid_split_writes_nothing(tmp_path):
    src = tmp_path / "d"
    write(src / "train.tsv", tsv(sample_rows(6, labels=(1, 0))))
    write(src / "dev.tsv", tsv([("great fun", 1), ("dull", 2)]))
    cfg = make_cfg(tmp_path)
    with pytest.raises(PipelineError, match=r"^dev\.tsv:3: label '2' does not occur in train\.tsv"):
        D.run_data_stage(cfg, str(src), "r")
    assert not (tmp_path / "out" / "processed" / "r").exists()
    # A previous good run stays as it was when a re-run fails.
    write(src / "dev.tsv", tsv([("great fun", 1), ("dull", 0)]))
    D.run_data_stage(cfg, str(src), "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "processed" / "r").iterdir()}
    write(src / "dev.tsv", tsv([("great fun", 1), ("", 0)]))
    with pytest.raises(PipelineError, match=r"^dev\.tsv:3: empty text"):
        D.run_data_stage(cfg, str(src), "r")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "processed" / "r").iterdir()} == before


def test_single_class_is_an_error(tmp_path):
    write(tmp_path / "d" / "train.tsv", tsv([("a", "x"), ("b", "x")]))
    with pytest.raises(PipelineError, match=r"train\.tsv:2: only one class \('x'\)"):
        D.run_data_stage(make_cfg(tmp_path), str(tmp_path / "d"), "r")


def test_header_read_as_data_is_a_singleton_class_with_a_hint(tmp_path):
    # "(en)" is no column name, so the first row is taken as an example of class 'sentiment'.
    write(tmp_path / "d" / "train.csv", "review text (en),sentiment\n" + "".join(f'"{t}",{l}\n' for t, l in REVIEWS))
    with pytest.raises(PipelineError) as e:
        D.run_data_stage(make_cfg(tmp_path), str(tmp_path / "d"), "r")
    assert str(e.value) == ("train.csv:1: class 'sentiment' has 1 example (needs at least 2); is line 1 a header? "
                            "name the columns with data.text_column/data.label_column")
    assert not (tmp_path / "out" / "processed" / "r").exists()


def test_singleton_class_elsewhere_names_its_line_without_the_hint(tmp_path):
    write(tmp_path / "d" / "train.tsv", tsv(sample_rows(6) + [("so so", "meh")]))
    with pytest.raises(PipelineError) as e:
        D.run_data_stage(make_cfg(tmp_path), str(tmp_path / "d"), "r")
    assert str(e.value) == "train.tsv:14: class 'meh' has 1 example (needs at least 2)"


@pytest.mark.skipif(not SST2.exists(), reason="no ../shared/data/sst2")
def test_reads_real_sst2_dev():
    """The shared SST-2 as its README describes it: 1,000 whole dev sentences (>= 10 words), none of them in train."""
    texts, labels = read.read_examples(SST2 / "dev.tsv", DataConfig())
    assert len(texts) == 1000 and set(labels) == {"0", "1"} and min(len(t.split()) for t in texts) >= 10
    train, train_labels = read.read_examples(SST2 / "train.tsv", DataConfig())
    assert len(train) == 53438 and set(train_labels) == {"0", "1"} and not set(texts) & set(train)


# ------------------------------------------------------------------------------ input pipeline

def write_records(path, lengths, cls=2, sep=3):
    with tf.io.TFRecordWriter(str(path)) as w:
        for i, n in enumerate(lengths):
            ids = [cls] + [10 + i] * (n - 2) + [sep]
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "input_word_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3])),
            })).SerializeToString())


def check_batch(features, labels, seq_len):
    ids, mask = features["input_word_ids"].numpy(), features["input_mask"].numpy()
    assert features["input_word_ids"].dtype == tf.int32 and labels.dtype == tf.int32
    assert ids.shape == mask.shape == features["input_type_ids"].shape and labels.shape == (ids.shape[0],)
    assert (mask == (ids != 0)).all() and not features["input_type_ids"].numpy().any()
    assert ids.shape[1] <= seq_len
    return ids, mask


def test_data_made_by_an_older_stage_is_refused_until_remade(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.text.processed import load_processed

    src = tmp_path / "d"
    write(src / "train.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in sample_rows(20)))
    cfg = make_cfg(tmp_path)
    D.run_data_stage(cfg, str(src), "r")
    path = Path(cfg.paths.data) / "processed" / "r" / "manifest.json"
    m = json.loads(path.read_text())
    m["stages"]["data"]["config"]["data_stage"]["version"] = processed.STAGE_VERSION - 1  # stats without newer fields
    path.write_text(json.dumps(m))
    with pytest.raises(PipelineError, match=r"made by an older data stage .*`python -m pipeline data --run r` again"):
        load_processed(cfg, "r")
    D.run_data_stage(cfg, None, "r")  # remade from the source it recorded
    assert load_processed(cfg, "r")[1]["train_encoder_mean_len"] > 2


def encoder_lengths(processed, encoder_len):
    """Wordpieces of each train record as the encoder reads it (cut to encoder_len, [CLS] and [SEP] included)."""
    ds = tf.data.TFRecordDataset(str(processed / "train.tfrecord"))
    return [int(tf.shape(dataset.parse_record(r, encoder_len)[0])[0]) for r in ds]


def test_seq_len_reaches_past_the_encoder_only_for_the_ngram_term(tmp_path):
    src = tmp_path / "d"
    rows = sample_rows(20) + [("great movie " * 30, "pos")]
    write(src / "train.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    cfg = make_cfg(tmp_path, max_seq_len=48)
    cfg.model.max_encoder_len = 16
    out = Path(cfg.paths.data) / "processed" / "r"
    stats = D.run_data_stage(cfg, str(src), "r")  # 31 rows: the n-gram term reads all 48
    assert (stats["seq_len"], stats["encoder_len"]) == (48, 16)
    lengths = encoder_lengths(out, 16)
    assert max(lengths) == 16 and stats["train_encoder_mean_len"] == pytest.approx(np.mean(lengths), abs=1e-3)
    cfg.model.ngram_max_rows = 10  # no n-gram term for 31 rows: nothing reads past the encoder
    stats = D.run_data_stage(cfg, str(src), "r")
    assert (stats["seq_len"], stats["encoder_len"]) == (16, 16)
    assert stats["train_encoder_mean_len"] == pytest.approx(np.mean(encoder_lengths(out, 16)), abs=1e-3)


def test_make_dataset_bucketed_training(tmp_path):
    lengths = list(range(3, 60)) * 2  # some longer than seq_len
    path = tmp_path / "t.tfrecord"
    write_records(path, lengths)
    assert dataset.count_records(path) == len(lengths)
    seq_len, total, widths = 32, 0, set()
    ds = dataset.make_dataset(path, seq_len, 8, training=True, seed=3)
    for features, labels in ds:
        ids, mask = check_batch(features, labels, seq_len)
        real = mask.sum(axis=1)
        assert ids.shape[1] == real.max()  # padded only to its longest member
        assert (ids[np.arange(len(ids)), real - 1] == 3).all()  # every row still ends with [SEP]
        total += len(ids)
        widths.add(ids.shape[1])
    assert total == len(lengths) and len(widths) > 3
    first = lambda d: [f["input_word_ids"].numpy()[:, 1].tolist() for f, _ in d]
    again = dataset.make_dataset(path, seq_len, 8, training=True, seed=3)
    assert first(ds) != first(ds)  # reshuffled every epoch
    assert first(dataset.make_dataset(path, seq_len, 8, training=True, seed=3)) == first(again)  # seeded


def test_epoch_seeded_order_is_the_same_after_a_restart(tmp_path):
    """A resumed training run starts at epoch k: its order must be epoch k's, not epoch 0's."""
    path = tmp_path / "t.tfrecord"
    write_records(path, list(range(3, 60)))
    order = lambda d: [f["input_word_ids"].numpy()[:, 1].tolist() for f, _ in d]  # noqa: E731
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = dataset.make_dataset(path, 32, 8, training=True, seed=3, epoch=epoch)
    orders = []
    for e in range(3):
        epoch.assign(e)
        orders.append(order(ds))
    assert orders[0] != orders[1] != orders[2]
    epoch.assign(1)
    assert order(ds) == orders[1]
    fresh = tf.Variable(2, dtype=tf.int64)  # a new process that resumes at epoch 2
    assert order(dataset.make_dataset(path, 32, 8, training=True, seed=3, epoch=fresh)) == orders[2]
    other = tf.Variable(2, dtype=tf.int64)
    assert order(dataset.make_dataset(path, 32, 8, training=True, seed=4, epoch=other)) != orders[2]


def test_make_dataset_fixed_padding_and_eval_order(tmp_path):
    lengths = [5, 40, 12, 7, 9]
    path = tmp_path / "t.tfrecord"
    write_records(path, lengths)
    batches = list(dataset.make_dataset(path, 16, 2, training=False))
    assert [len(l) for _, l in batches] == [2, 2, 1]  # the remainder is kept
    labels = np.concatenate([l.numpy() for _, l in batches])
    assert labels.tolist() == [i % 3 for i in range(5)]  # file order
    for features, l in batches:
        ids, _ = check_batch(features, l, 16)
        assert ids.shape[1] == 16
    train = list(dataset.make_dataset(path, 16, 2, training=True, bucketing=False, seed=0))
    assert sum(len(l) for _, l in train) == 5
    assert all(f["input_word_ids"].shape[1] == 16 for f, _ in train)


# ------------------------------------------------------------------------------ download

def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(zipfile.ZipInfo(name), content)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_sst2_from_file_url(tmp_path):
    zip_path, sha = make_zip(tmp_path / "src.zip", {
        "SST-2/train.tsv": tsv([("good", 1), ("bad", 0)]),
        "SST-2/dev.tsv": tsv([("fine", 1)]),
        "SST-2/test.tsv": "index\tsentence\n0\tunlabelled\n",
    })
    raw = tmp_path / "raw"
    got = sst2.download_sst2(raw, url=zip_path.as_uri(), sha256=sha)
    assert got == raw / "SST-2" and sorted(p.name for p in got.iterdir()) == ["dev.tsv", "train.tsv"]
    assert read.read_examples(got / "train.tsv", DataConfig()) == (["good", "bad"], ["1", "0"])
    zip_path.unlink()  # already there: nothing is fetched again
    assert sst2.download_sst2(raw, url=zip_path.as_uri(), sha256=sha) == got


def test_checksum_mismatch_is_refused(tmp_path):
    zip_path, _ = make_zip(tmp_path / "src.zip", {"SST-2/train.tsv": "x\t1\n", "SST-2/dev.tsv": "x\t1\n"})
    raw = tmp_path / "raw"
    with pytest.raises(PipelineError, match="SHA-256 mismatch"):
        sst2.download_sst2(raw, url=zip_path.as_uri(), sha256="0" * 64)
    assert not (raw / "SST-2.zip").exists() and not (raw / "SST-2").exists()
    assert list(raw.iterdir()) == []  # no temp file left behind


@pytest.mark.parametrize("evil", ["../evil.txt", "SST-2/../../evil.txt", "/tmp/liteformer-evil.txt"])
def test_unsafe_zip_member_is_refused(tmp_path, evil):
    zip_path, sha = make_zip(tmp_path / "src.zip", {
        "SST-2/train.tsv": "x\t1\n", "SST-2/dev.tsv": "x\t1\n", evil: "gotcha"})
    raw = tmp_path / "a" / "raw"
    with pytest.raises(PipelineError, match="outside"):
        sst2.download_sst2(raw, url=zip_path.as_uri(), sha256=sha)
    assert not (raw / "SST-2").exists()
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/liteformer-evil.txt").exists()
