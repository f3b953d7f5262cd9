"""Data stage: read and validate labelled text, split, tokenize, write TFRecords; and the input pipeline.

A data directory holds train.{tsv,csv,jsonl} and optionally dev.* and test.*, with or without a
header row; columns not named as configured are chosen by content. The stage writes
data/processed/<run>/ with vocab.txt, labels.txt, {train,dev,test}.tfrecord, {train,dev,test}.jsonl
(the texts and labels of each split as used) and stats.json; make_dataset() turns a .tfrecord into
batches for Keras.
"""
import collections
import dataclasses
import csv
import io
import json
import math
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import tensorflow as tf
from pipeline.model import backbone
from pipeline.core import manifest
from pipeline.text import vectors
from pipeline.text import tokenizer as tok
from pipeline.core.download import fetch
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, write_json, write_text

FORMATS = (".tsv", ".csv", ".jsonl")
SPLITS = ("train", "dev", "test")
IMBALANCE_RATIO = 3.0  # warn when the largest class is this many times the smallest
# Bump when the data stage's outputs or the way it reads files change, so older runs are rebuilt.
STAGE_VERSION = 5  # 2: train.jsonl; header rows and columns recognised by content. 3: word vectors. 4: their learned-vocabulary size. 5: train_encoder_mean_len

# GLUE SST-2. Checksum and size from tensorflow/datasets, tensorflow_datasets/url_checksums/glue.txt
# (SST-2.zip, 7439277 bytes); the same values are listed for this address in the Hugging Face
# datasets-server docs ("download_checksums" of glue/sst2).
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_SHA256 = "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"
SST2_KEEP = ("train.tsv", "dev.tsv")  # GLUE's test.tsv has no labels

# csv refuses fields over 128 KiB by default; a long text is legal (the tokenizer cuts it).
csv.field_size_limit(1 << 30)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Reading and validation

def read_table(path, data_cfg, require_labels=True) -> dict:
    """Parse and validate one file: dict(texts, labels, lines, text_column, label_column, header).

    labels is None for an unlabelled file (allowed only with require_labels=False); lines holds each
    example's line number for messages; header is True when the first row named the columns.
    Columns not named as configured are chosen by content (see _choose_columns). Raises PipelineError
    naming file:line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PipelineError(f"{path}: unsupported format '{path.suffix}' (use .tsv, .csv or .jsonl)")
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    text = _decode(path.name, path.read_bytes())
    if suffix == ".jsonl":
        out = _parse_jsonl(path.name, text, data_cfg, require_labels)
    else:
        out = _parse_delimited(path.name, text, data_cfg, suffix, require_labels)
    _warn_quality(path.name, out)
    return out


def read_texts(source, data_cfg) -> list[str]:
    """Texts to classify: one per line (blank lines skipped) from a .txt file or '-' (stdin), else the
    text column of a .tsv/.csv/.jsonl as read_table finds it."""
    if source != "-" and Path(source).suffix.lower() != ".txt":
        return read_table(source, data_cfg, require_labels=False)["texts"]
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # bytes, so bad UTF-8 gets our message, not a traceback
        name, raw = "stdin", stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
    else:
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"{path}: file not found")
        name, raw = path.name, path.read_bytes()
    return [s.strip() for s in _decode(name, raw).split("\n") if s.strip()]


def _decode(name, raw):
    """UTF-8 text of a data file, without a BOM; PipelineError for an empty, UTF-16 or non-UTF-8 file."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise PipelineError(f"{name}:1: empty file")
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        hint = " (a UTF-16 file? save it as UTF-8)" if nul < 4 else ""
        raise PipelineError(f"{name}:{line}: NUL byte in the data{hint}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PipelineError(f"{name}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


# A column name: starts with a letter or "_", then at most 40 word characters, spaces, dots or dashes,
# in at most four words. Prose and numbers ("1", "0.5") are not names.
NAME_RE = re.compile(r"[A-Za-z_][\w .-]{0,40}")


def _is_name(field):
    return bool(NAME_RE.fullmatch(field)) and len(field.split()) <= 4


def _label_like(values):
    """Few distinct values, some repeated: what a label column holds (ids and texts are all different)."""
    distinct = len(set(values))
    return distinct < len(values) and distinct <= max(20, len(values) // 20)


def _distinct_chars(values):
    """Characters in a column's distinct values: most for the text column. Mean length alone can
    pick a label column ("positive" is longer than "awful"); labels repeat, texts mostly do not."""
    return sum(map(len, set(values)))


def _looks_like_header(first, rest):
    """Whether a first row that names no configured column is a header anyway, judged by content."""
    # Rule: every field of the row looks like a column name (_is_name, all different), and the rows
    # below contradict its being an example:
    #  - where some column is label-like (_label_like below the first row), the first row's value
    #    occurs in none of them: a real example's label recurs among the other examples, a column
    #    name does not ("sentiment" never appears among pos/neg);
    #  - where no column is label-like (e.g. one text column), its value in the text column (the most
    #    distinct characters) is under a quarter of that column's median length, with 5+ rows below.
    # Anything less certain, and files of under 3 rows, read as data: GLUE's headerless text<TAB>label
    # and label-first World<TAB>news text keep their first example ("World" recurs; "1" is no name).
    rest = [[f.strip() for f in fields] for _, fields in rest if len(fields) == len(first)]
    if len(rest) < 2 or len(set(first)) < len(first) or not all(map(_is_name, first)):
        return False
    columns = list(zip(*rest))
    labels = [j for j, col in enumerate(columns) if _label_like(col)]
    if labels:
        return all(first[j] not in columns[j] for j in labels)
    text_j = max(range(len(columns)), key=lambda j: _distinct_chars(columns[j]))
    median = sorted(map(len, columns[text_j]))[len(rest) // 2]
    return len(rest) >= 5 and 4 * len(first[text_j]) <= median


def _choose_columns(name, line, names, columns, data_cfg, require_labels, header):
    """(text index, label index or None): the configured names (or "text"/"label") when the header has
    them, else by content; prints to stderr what it chose by content among 2+ columns."""
    text_names, label_names = (data_cfg.text_column, "text"), (data_cfg.label_column, "label")
    named = lambda wanted: next((names.index(c) for c in wanted if header and c in names), None)  # noqa: E731
    text_i, label_i = named(text_names), named(label_names)
    guessed = text_i is None
    if text_i is None:
        others = [j for j in range(len(names)) if j != label_i]
        if not others:
            raise PipelineError(f"{name}:{line}: missing text column {_either(data_cfg.text_column, 'text')}; "
                                f"columns: {', '.join(names)}")
        text_i = max(others, key=lambda j: (_distinct_chars(columns[j]), -j))  # ties: the leftmost
    if label_i is None:  # fewest distinct values among label-like columns
        others = [j for j in range(len(names)) if j != text_i]
        candidates = [j for j in others if _label_like(columns[j])]
        if not header and len(others) == 1:
            candidates = others  # headerless text,label (or label,text): the other column, as GLUE writes it
        label_i = min(candidates, key=lambda j: (len(set(columns[j])), j)) if candidates else None
        guessed = guessed or label_i is not None
    if label_i is None and require_labels:
        if not header and len(names) == 1:
            raise PipelineError(f"{name}:{line}: one column and no header, so no labels; expected "
                                f"text{'<TAB>' if name.lower().endswith('.tsv') else ','}label")
        raise PipelineError(f"{name}:{line}: missing label column {_either(data_cfg.label_column, 'label')}, and no "
                            f"other column has few, repeated values as labels do; columns: {', '.join(names)}")
    if guessed and len(names) > 1:
        label = f"label column '{names[label_i]}'" if label_i is not None else "no label column"
        if header:
            how = "set data.text_column/data.label_column to override"
        else:
            how = (f"no header; add one naming the '{data_cfg.text_column}' and '{data_cfg.label_column}' "
                   "columns to override")
        print(f"reading {name}: text column '{names[text_i]}', {label} (chosen by content; {how})", file=sys.stderr)
    return text_i, label_i


def _parse_delimited(name, text, data_cfg, suffix, require_labels):
    # TSV as GLUE writes it: no quoting, a quote is an ordinary character. CSV: standard quoting,
    # so commas and newlines inside quoted fields work. newline="" lets csv handle CRLF itself.
    if suffix == ".tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows = []  # (line where the record starts, fields)
    end = 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields and not (len(fields) == 1 and not fields[0].strip()):  # skip blank lines
                rows.append((start, fields))
    except csv.Error as e:  # e.g. a quote never closed: name the line where the record starts
        raise PipelineError(f"{name}:{end + 1}: {e}") from None
    if not rows:
        raise PipelineError(f"{name}:1: empty file")

    configured = {data_cfg.text_column, "text", data_cfg.label_column, "label"}
    head_line, first = rows[0][0], [f.strip() for f in rows[0][1]]
    header = any(f in configured for f in first) or _looks_like_header(first, rows[1:])
    if header:
        names, rows = first, rows[1:]
        if not rows:
            raise PipelineError(f"{name}:{head_line}: header only, no data rows")
    else:
        names = [f"column {i + 1}" for i in range(len(first))]

    n_fields = len(names)
    sep_hint = " (a tab inside the text?)" if suffix == ".tsv" else " (an unquoted comma, or a quote never closed?)"
    for line, fields in rows:
        if len(fields) != n_fields:
            raise PipelineError(f"{name}:{line}: expected {n_fields} fields, found {len(fields)}{sep_hint}")
    columns = [[fields[j].strip() for _, fields in rows] for j in range(n_fields)]
    text_i, label_i = _choose_columns(name, head_line, names, columns, data_cfg, require_labels, header)

    texts, labels, lines = [], [], []
    for line, fields in rows:
        texts.append(_check_text(name, line, fields[text_i]))
        if label_i is not None:
            labels.append(_check_label(name, line, fields[label_i]))
        lines.append(line)
    return dict(texts=texts, labels=labels if label_i is not None else None, lines=lines, header=header,
                text_column=names[text_i], label_column=names[label_i] if label_i is not None else None)


def _parse_jsonl(name, text, data_cfg, require_labels):
    objs = []  # (line, object)
    for line, s in enumerate(text.split("\n"), 1):  # split("\n"): JSON strings may hold U+2028
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{name}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{name}:{line}: expected a JSON object, got {type(obj).__name__}")
        objs.append((line, obj))

    # Keys: the configured ones (or "text"/"label") on each line; when the first object has neither,
    # the key chosen by content among the first object's string and integer fields.
    text_keys, label_keys = [data_cfg.text_column, "text"], [data_cfg.label_column, "label"]
    first = objs[0][1]
    if not any(k in first for k in text_keys) or not any(k in first for k in label_keys):
        keys = [k for k, v in first.items() if isinstance(v, (str, int)) and not isinstance(v, bool)]
        if any(k not in text_keys + label_keys for k in keys):  # else the per-line "missing field" errors say it
            columns = [[str(o[k]) for _, o in objs if isinstance(o.get(k), (str, int))] for k in keys]
            text_i, label_i = _choose_columns(name, objs[0][0], keys, columns, data_cfg, False, True)
            text_keys.append(keys[text_i])
            if label_i is not None:
                label_keys.append(keys[label_i])

    texts, labels, lines = [], [], []
    text_cols, label_cols = set(), set()
    for line, obj in objs:
        key = next((k for k in text_keys if k in obj), None)
        if key is None:
            raise PipelineError(f"{name}:{line}: missing text field {_either(data_cfg.text_column, 'text')}")
        if not isinstance(obj[key], str):
            raise PipelineError(f"{name}:{line}: text must be a string, got {type(obj[key]).__name__}")
        text_cols.add(key)
        texts.append(_check_text(name, line, obj[key]))
        lines.append(line)
        label_key = next((k for k in label_keys if k in obj and k != key), None)
        if label_key is not None:
            value = obj[label_key]
            if value is None:
                raise PipelineError(f"{name}:{line}: empty label")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise PipelineError(f"{name}:{line}: label must be a string or an integer, got {value!r}")
            labels.append(_check_label(name, line, str(value)))
            label_cols.add(label_key)
        elif require_labels or labels:
            raise PipelineError(f"{name}:{line}: missing label field {_either(data_cfg.label_column, 'label')}")
    if labels and len(labels) != len(texts):  # labels start only after some unlabelled lines
        raise PipelineError(f"{name}:{lines[0]}: missing label field '{data_cfg.label_column}'")
    return dict(texts=texts, labels=labels if labels else None, lines=lines, header=False,
                text_column="/".join(sorted(text_cols)), label_column="/".join(sorted(label_cols)) or None)


def _either(column, fallback):
    """'column' (or 'fallback'), naming the fallback only when it differs."""
    return f"'{column}'" + (f" (or '{fallback}')" if column != fallback else "")


def _check_text(name, line, value):
    value = value.strip()
    if not value:
        raise PipelineError(f"{name}:{line}: empty text")
    return value


def _check_label(name, line, value):
    value = value.strip()
    if not value:
        raise PipelineError(f"{name}:{line}: empty label")
    if "\n" in value or "\r" in value:  # labels.txt holds one label per line
        raise PipelineError(f"{name}:{line}: label contains a line break")
    return value


def _warn_quality(name, out):
    """Warnings, not errors: duplicates and class imbalance are legal but worth knowing."""
    first, dups, conflicts = {}, 0, 0
    labels = out["labels"]
    for i, t in enumerate(out["texts"]):
        if t in first:
            dups += 1
            if labels is not None and labels[first[t]] != labels[i]:
                conflicts += 1
            if dups == 1:
                example = (out["lines"][i], out["lines"][first[t]])
        else:
            first[t] = i
    if dups:
        extra = f", {conflicts} of them with a different label" if conflicts else ""
        warn(f"{name}: {dups} duplicate texts{extra} (e.g. line {example[0]} repeats line {example[1]})")
    if labels is not None:
        counts = collections.Counter(labels)
        if len(counts) > 1 and max(counts.values()) > IMBALANCE_RATIO * min(counts.values()):
            desc = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
            warn(f"{name}: class imbalance ({desc})")


def read_examples(path, data_cfg, *, require_labels=True) -> tuple[list[str], list[str]]:
    """Read a .tsv/.csv/.jsonl file into (texts, label strings); PipelineError names file:line.

    With require_labels=False an unlabelled file (one headerless column) gives an empty label list.
    """
    out = read_table(path, data_cfg, require_labels)
    return out["texts"], out["labels"] or []


def find_splits(data_dir) -> dict[str, Path]:
    """{'train': path, 'dev': path?, 'test': path?} for a data directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PipelineError(f"{data_dir}: data directory not found")
    found = {}
    for split in SPLITS:
        paths = [data_dir / f"{split}{ext}" for ext in FORMATS if (data_dir / f"{split}{ext}").is_file()]
        if len(paths) > 1:
            raise PipelineError(f"{data_dir}: both {' and '.join(p.name for p in paths)}; keep one")
        if paths:
            found[split] = paths[0]
    if "train" not in found:
        raise PipelineError(f"{data_dir}: no train.tsv, train.csv or train.jsonl")
    return found


def find_unlabeled(data_dir) -> Path | None:
    """The data directory's unlabelled texts for pretraining: unlabeled.txt (one text per line) or
    unlabeled.tsv/.csv/.jsonl (a text column), or None."""
    paths = [Path(data_dir) / f"unlabeled{ext}" for ext in (".txt", *FORMATS)]
    paths = [p for p in paths if p.is_file()]
    if len(paths) > 1:
        raise PipelineError(f"{data_dir}: both {' and '.join(p.name for p in paths)}; keep one")
    return paths[0] if paths else None


def sort_labels(labels) -> list[str]:
    """Distinct labels in id order: numeric when all are integers, else alphabetical."""
    distinct = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", s) for s in distinct):
        return sorted(distinct, key=lambda s: (int(s), s))
    return sorted(distinct)


def stratified_split(labels, fraction, seed) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified hold-out: (keep indices, held-out indices), both in file order."""
    if not 0.0 < fraction < 1.0:
        raise PipelineError(f"data.dev_fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    held = []
    for label in sorted(set(labels.tolist())):  # fixed class order, so the rng draws are reproducible
        idx = np.flatnonzero(labels == label)
        n = min(int(round(len(idx) * fraction)), len(idx) - 1)  # keep at least one in train
        held.append(rng.permutation(idx)[:n])
    held = np.sort(np.concatenate(held)).astype(np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def load_labels(directory) -> list[str]:
    """Labels of a processed run (or any directory with labels.txt); id = line index."""
    path = Path(directory) / "labels.txt"
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    labels = [s for s in path.read_text(encoding="utf-8").split("\n") if s]
    if not labels:
        raise PipelineError(f"{path}: empty")
    return labels


def load_stats(directory) -> dict:
    """stats.json of a processed run."""
    path = Path(directory) / "stats.json"
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    return json.loads(path.read_text(encoding="utf-8"))


def processed_dir(cfg, run) -> Path:
    return Path(cfg.paths.data) / "processed" / run


# ----------------------------------------------------------------------------------------------
# GLUE SST-2 download

def safe_extract(zip_path, dest, keep=None) -> Path:
    """Extract a zip's files by base name into `dest` (atomically), refusing the whole archive if
    any member path would resolve outside it. keep: optional set of member names to extract."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise PipelineError(f"{zip_path}: not a zip file") from None
    with zf, atomic_path(dest) as tmp:
        root = tmp.resolve()
        # Check every member before writing anything: one escaping path means a hostile archive.
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", info.filename) \
                    or not target.is_relative_to(root):
                raise PipelineError(f"{zip_path.name}: member '{info.filename}' would be written outside "
                                    f"{dest}; refusing to extract")
        tmp.mkdir()
        for info in zf.infolist():
            if info.is_dir() or (keep is not None and info.filename not in keep):
                continue
            with zf.open(info) as src, open(tmp / Path(info.filename).name, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def download_sst2(raw_dir, url=SST2_URL, sha256=SST2_SHA256) -> Path:
    """Fetch GLUE SST-2 into raw_dir/SST-2 (train.tsv, dev.tsv) and return that directory."""
    raw_dir = Path(raw_dir)
    target = raw_dir / "SST-2"
    if all((target / n).is_file() for n in SST2_KEEP):
        return target
    zip_path = fetch(url, raw_dir / "SST-2.zip", sha256,
                     hint=f"save it by hand as {raw_dir / 'SST-2.zip'}, or pass --data DIR")
    safe_extract(zip_path, target, keep={f"SST-2/{n}" for n in SST2_KEEP})
    missing = [n for n in SST2_KEEP if not (target / n).is_file()]
    if missing:
        shutil.rmtree(target, ignore_errors=True)  # so the next run does not take it as done
        raise PipelineError(f"{zip_path}: no {', '.join(missing)} in the archive")
    return target


# ----------------------------------------------------------------------------------------------
# The data stage

def _tokenize_split(tokenizer, texts, max_chars):
    """Wordpiece ids (no [CLS]/[SEP]) of every text: one RaggedTensor [len(texts), None]."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(texts, tf.string)).batch(1024)
    return tf.concat(list(ds.map(lambda t: tok.wordpiece_ids(tokenizer, t, max_chars))), axis=0)


def _write_tfrecord(path, ids, labels, seq_len, cls_id, sep_id):
    packed = tok.add_special_tokens(ids, seq_len, cls_id, sep_id)
    rows = np.split(packed.flat_values.numpy().astype(np.int64), packed.row_splits.numpy()[1:-1])
    assert len(rows) == len(labels), (len(rows), len(labels))
    with tf.io.TFRecordWriter(str(path)) as w:
        for row, label in zip(rows, labels):
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "input_word_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=row)),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            })).SerializeToString())


def _write_jsonl(path, texts, labels):
    write_text(path, "".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n"
                             for t, l in zip(texts, labels)))


def run_data_stage(cfg, data_dir: str | None, run: str) -> dict:
    """Read, validate, split and tokenize a data directory into data/processed/<run>/; return stats."""
    t0 = time.time()
    dc = cfg.data
    if not run or run in (".", "..") or "/" in run or "\\" in run:
        raise PipelineError(f"invalid run name {run!r}")
    if dc.max_seq_len < 8:
        raise PipelineError(f"data.max_seq_len must be at least 8, got {dc.max_seq_len}")
    if dc.vector_words < 0:
        raise PipelineError(f"data.vector_words must be 0 or more, got {dc.vector_words}")
    if not 0 < dc.length_percentile <= 100:
        raise PipelineError(f"data.length_percentile must be in (0, 100], got {dc.length_percentile}")
    out = processed_dir(cfg, run)
    if data_dir is not None:
        src = Path(data_dir)
    else:  # the directory this run was made from, else the GLUE SST-2 download
        raw = Path(cfg.paths.data) / "raw"
        src = Path(load_stats(out)["source"]) if (out / "stats.json").is_file() else raw / "SST-2"
        if src.resolve() == (raw / "SST-2").resolve():
            src = download_sst2(raw)
        elif not src.is_dir():
            print(f"data: up to date ({src} is gone; {out} stays as it was made; --data DIR to remake it)")
            return load_stats(out)

    # 1. Read and validate everything before writing anything (unless nothing changed since last time).
    files = find_splits(src)
    unlabeled_file = find_unlabeled(src)
    pretrained = backbone.configured_dir(cfg)
    word_vectors = "none" if pretrained else dc.word_vectors  # a backbone's embeddings already know the words
    vector_file = [Path(word_vectors)] if word_vectors != "none" else []
    m = cfg.model  # what the encoder and the n-gram term read decides seq_len
    key = {"config": {"data": {**dataclasses.asdict(dc), "word_vectors": word_vectors},
                      "model": {k: getattr(m, k) for k in ("max_encoder_len", "ngram_order", "ngram_max_rows")},
                      **manifest.version_config("data", STAGE_VERSION)},
           "inputs": manifest.files_checksums([*files.values(), *([unlabeled_file] if unlabeled_file else []),
                                               *vector_file])}
    if pretrained:
        key["inputs"]["backbone vocab.txt"] = manifest.sha256(pretrained / "vocab.txt")
    if manifest.up_to_date(out, "data", key):
        return load_stats(out)
    parsed = {split: read_table(path, dc) for split, path in files.items()}
    unlabeled = read_texts(unlabeled_file, dc) if unlabeled_file else []
    train = parsed["train"]
    labels = sort_labels(train["labels"])
    if len(labels) < 2:
        raise PipelineError(f"{files['train'].name}:{train['lines'][0]}: only one class ('{labels[0]}') "
                            "in the whole file; a classifier needs at least two")
    counts = collections.Counter(train["labels"])
    for l, line in zip(train["labels"], train["lines"]):
        if counts[l] < 2:  # cannot be both learned and held out; often a header read as an example
            hint = ""
            if line == train["lines"][0] and not train["header"] and files["train"].suffix.lower() != ".jsonl":
                hint = f"; is line {line} a header? name the columns with data.text_column/data.label_column"
            raise PipelineError(f"{files['train'].name}:{line}: class '{l}' has 1 example (needs at least 2){hint}")
    label_id = {l: i for i, l in enumerate(labels)}
    for split in ("dev", "test"):
        if split in parsed:
            p = parsed[split]
            for l, line in zip(p["labels"], p["lines"]):
                if l not in label_id:
                    raise PipelineError(f"{files[split].name}:{line}: label '{l}' does not occur in "
                                        f"{files['train'].name} (labels: {', '.join(labels)})")

    splits = {s: (p["texts"], p["labels"]) for s, p in parsed.items()}
    sources = {s: files[s].name for s in files}
    if "dev" not in splits:
        keep, held = stratified_split(train["labels"], dc.dev_fraction, dc.seed)
        if len(held) == 0:
            raise PipelineError(f"{files['train'].name}: too few rows to hold out a dev split "
                                f"(dev_fraction {dc.dev_fraction}); add a dev file")
        t, l = splits["train"]
        splits["train"] = ([t[i] for i in keep], [l[i] for i in keep])
        splits["dev"] = ([t[i] for i in held], [l[i] for i in held])
        sources["dev"] = f"{files['train'].name} (stratified hold-out, fraction {dc.dev_fraction}, seed {dc.seed})"
        splits = {s: splits[s] for s in SPLITS if s in splits}  # train, dev, test order
    train_texts = set(splits["train"][0])
    for split in ("dev", "test"):
        if split in splits:
            n = sum(t in train_texts for t in splits[split][0])
            if n:
                warn(f"{sources[split]}: {n} of {len(splits[split][0])} texts also occur in train")

    # 2. Vocabulary from train and the unlabelled texts (never dev or test), then wordpieces of every
    # split (batched tf ops).
    max_chars = dc.max_seq_len * tok.CHARS_PER_TOKEN
    if pretrained:
        vocab = tok.load_vocabulary(pretrained / "vocab.txt")
        print(f"vocabulary: the backbone's ({pretrained / 'vocab.txt'}, {len(vocab):,} tokens); no word vectors")
    else:
        vocab = tok.learn_vocabulary([t[:max_chars] for t in splits["train"][0] + unlabeled], dc.vocab_size)
    learned = len(vocab)
    if word_vectors != "none":
        words, word_vecs = vectors.read_vectors_file(word_vectors)
        vocab = vectors.extend_vocabulary(vocab, words, dc.vector_words)
    tokenizer = tok.make_tokenizer(vocab)
    unk_id, cls_id, sep_id = (tokenizer.token_to_id(t) for t in (tok.UNK, tok.CLS, tok.SEP))
    ids = {s: _tokenize_split(tokenizer, texts, max_chars) for s, (texts, _) in splits.items()}
    unlabeled_ids = _tokenize_split(tokenizer, unlabeled, max_chars) if unlabeled else None
    lengths = {s: r.row_lengths().numpy() + 2 for s, r in ids.items()}
    # OOV rate: the fraction of wordpieces (before truncation) that are [UNK].
    oov = {s: float((r.flat_values.numpy() == unk_id).sum()) / max(1, r.flat_values.shape[0])
           for s, r in ids.items()}

    # 3. Sequence length: a percentile of train lengths ([CLS] and [SEP] included), capped at data.max_seq_len
    # when the n-gram term reads it, else at what the encoder reads.
    from pipeline.model.layers import encoder_length
    from pipeline.model.ngram import term_used

    pct = float(np.percentile(lengths["train"], dc.length_percentile))
    reach = encoder_length(m, dc.max_seq_len, backbone.read_spec(pretrained) if pretrained else None)
    cap = dc.max_seq_len if term_used(m, len(splits["train"][0])) else reach
    seq_len = int(max(8, min(cap, math.ceil(pct))))

    stats = {
        "source": str(src.resolve()),
        "files": sources,
        "text_column": train["text_column"],
        "label_column": train["label_column"],
        "labels": labels,
        "rows": {s: len(splits[s][0]) for s in splits},
        "class_counts": {s: {l: c for l, c in sorted(collections.Counter(splits[s][1]).items(),
                                                      key=lambda kv: label_id[kv[0]])} for s in splits},
        "train_token_lengths": {**{f"p{q}": float(np.percentile(lengths["train"], q)) for q in (50, 90, 95, 99)},
                                "max": int(lengths["train"].max())},
        "seq_len": seq_len,
        "encoder_len": min(seq_len, reach),
        # wordpieces a train text gives the encoder, on average: train.max_tokens divides by it
        "train_encoder_mean_len": round(float(np.minimum(lengths["train"], min(seq_len, reach)).mean()), 3),
        "length_percentile": dc.length_percentile,
        "vocab_size": len(vocab),
        "word_vectors": None,
        "backbone": cfg.model.backbone if pretrained else None,
        "oov_rate": {s: round(v, 6) for s, v in oov.items()},
        "truncated_fraction": {s: round(float((lengths[s] > seq_len).mean()), 6) for s in splits},
        "unlabeled": {"file": unlabeled_file.name, "rows": len(unlabeled)} if unlabeled_file else None,
    }

    if word_vectors != "none":
        table = vectors.vector_table(vocab, words, word_vecs)
        texts = [ids["train"]] + ([unlabeled_ids] if unlabeled else [])  # what training can learn from
        seen = np.bincount(np.concatenate([r.flat_values.numpy() for r in texts]), minlength=len(vocab)) > 0
        seen[[tokenizer.token_to_id(tok.PAD), cls_id, sep_id]] = True  # in every model input
        has = table.any(axis=1)
        stats["word_vectors"] = {"source": word_vectors, "dim": int(table.shape[1]), "learned_tokens": learned,
                                 "added_words": len(vocab) - learned, "tokens_with_vectors": int(has.sum()),
                                 "unseen_tokens": {s: _unseen_share(ids[s], seen) for s in ("dev", "test") if s in ids}}

    # 4. Write the run directory whole: it appears complete or not at all.
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tok.save_vocabulary(vocab, tmp / "vocab.txt")
        write_text(tmp / "labels.txt", "".join(f"{l}\n" for l in labels))
        for s, (texts, labs) in splits.items():
            _write_tfrecord(tmp / f"{s}.tfrecord", ids[s], [label_id[l] for l in labs], seq_len, cls_id, sep_id)
            _write_jsonl(tmp / f"{s}.jsonl", texts, labs)
        if unlabeled:  # for make pretrain; label -1: no label
            _write_tfrecord(tmp / "unlabeled.tfrecord", unlabeled_ids, [-1] * len(unlabeled), seq_len, cls_id, sep_id)
        if word_vectors != "none":
            vectors.save_word_vectors(tmp / vectors.FILE_NAME, table, seen, learned)
        write_json(tmp / "stats.json", stats)
        manifest.record(tmp, "data", key, sorted(p.name for p in tmp.iterdir()))

    _print_summary(out, stats, time.time() - t0)
    return stats


def _unseen_share(ids, seen):
    """Fraction of a split's wordpieces that no training text has."""
    flat = ids.flat_values.numpy()
    return round(float((~seen[flat]).mean()), 6) if flat.size else 0.0


def _print_summary(out, stats, seconds):
    rows = ", ".join(f"{s} {n:,}" for s, n in stats["rows"].items())
    counts = ", ".join(f"{l}: {c:,}" for l, c in stats["class_counts"]["train"].items())
    lens = stats["train_token_lengths"]
    oov = ", ".join(f"{s} {r:.3%}" for s, r in stats["oov_rate"].items())
    print(f"data: {stats['source']} -> {out}")
    print(f"  rows: {rows}")
    print(f"  classes: {len(stats['labels'])} (train {counts})")
    print(f"  seq_len: {stats['seq_len']} (p{stats['length_percentile']:g} of train lengths; "
          f"p50 {lens['p50']:g}, max {lens['max']}; {stats['truncated_fraction']['train']:.2%} of train truncated)")
    if stats.get("encoder_len", stats["seq_len"]) < stats["seq_len"]:
        print(f"  the encoder reads the first {stats['encoder_len']} wordpieces of a text, the n-gram term all "
              f"{stats['seq_len']} (model.max_encoder_len)")
    print(f"  vocab: {stats['vocab_size']:,} tokens; OOV: {oov}")
    wv = stats.get("word_vectors")
    if wv:
        unseen = ", ".join(f"{s} {r:.1%}" for s, r in wv["unseen_tokens"].items())
        print(f"  word vectors: {wv['source']} ({wv['dim']} dims) for {wv['tokens_with_vectors']:,} tokens, "
              f"{wv['added_words']:,} of them words added to the {wv['learned_tokens']:,} learned; "
              f"wordpieces no training text has: {unseen}")
    if stats.get("unlabeled"):
        print(f"  unlabelled: {stats['unlabeled']['rows']:,} texts from {stats['unlabeled']['file']} "
              "(vocabulary and make pretrain)")
    print(f"  done in {seconds:.0f}s")


# ----------------------------------------------------------------------------------------------
# Input pipeline for training and evaluation

SHUFFLE_BUFFER = 100_000  # records; SST-2's 60k serialized examples take a few MB


def bucket_boundaries(seq_len) -> list[int]:
    """Seven length boundaries at seq_len/8, 2/8 ... 7/8 (a bucket holds lengths below its boundary)."""
    bounds = {int(round(seq_len * f / 8)) for f in range(1, 8)}
    return sorted(b for b in bounds if 2 < b <= seq_len)


def count_records(path) -> int:
    return int(tf.data.TFRecordDataset(str(path)).reduce(np.int64(0), lambda n, _: n + 1))


_FEATURES = {"input_word_ids": tf.io.RaggedFeature(tf.int64), "label": tf.io.FixedLenFeature([], tf.int64)}


def parse_record(record, seq_len):
    """One serialized example -> (int32 ids cut to seq_len, int32 label). Records longer than seq_len
    (written with a larger one) keep their final [SEP]."""
    ex = tf.io.parse_single_example(record, _FEATURES)
    ids = tf.cast(ex["input_word_ids"], tf.int32)
    n = tf.minimum(tf.shape(ids)[0], seq_len)
    return tf.concat([ids[: n - 1], ids[-1:]], axis=0), tf.cast(ex["label"], tf.int32)


def make_dataset(tfrecord_path, seq_len, batch_size, *, training: bool, bucketing: bool = True,
                 seed: int | None = None, epoch: tf.Variable | None = None, num_classes: int | None = None):
    """Batches of ({"input_word_ids", "input_mask", "input_type_ids"}: int32 [b, len], label: int32 [b]),
    or labels one-hot float32 [b, num_classes] when num_classes is given (label smoothing needs them).

    training: shuffled each epoch, and batched by similar length (each batch padded to its longest
    member) when bucketing, else padded to seq_len. Eval: file order, padded to seq_len.
    No batch is ever dropped. With `epoch` (an int64 variable the trainer sets at the start of each
    epoch), epoch e's order depends only on (seed, e), so a resumed run sees the same order.
    """
    path = Path(tfrecord_path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    def parse(record):
        return parse_record(record, seq_len)

    def to_inputs(ids, label):
        mask = tf.cast(tf.not_equal(ids, 0), tf.int32)  # [PAD] (id 0) is never a real token
        if num_classes:
            label = tf.one_hot(label, num_classes)
        return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": tf.zeros_like(ids)}, label

    ds = tf.data.TFRecordDataset(str(path))
    if training and epoch is not None:
        # The whole file in memory (serialized records: a few MB for SST-2), permuted by a stateless
        # shuffle of (seed, epoch). flat_map reads the variable when an epoch's iteration starts,
        # after on_epoch_begin set it.
        records = tf.constant(list(ds.as_numpy_iterator()), dtype=tf.string)

        def epoch_records(_):
            key = tf.stack([tf.constant(seed or 0, tf.int64), epoch.read_value()])
            order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(records)[0]), seed=key)
            return tf.data.Dataset.from_tensor_slices(tf.gather(records, order))

        ds = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(epoch_records)
    elif training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and bucketing:
        bounds = bucket_boundaries(seq_len)
        ds = ds.bucket_by_sequence_length(
            lambda ids, label: tf.shape(ids)[0], bounds, [batch_size] * (len(bounds) + 1),
            padded_shapes=([None], []), drop_remainder=False)
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=([seq_len], []), drop_remainder=False)
    ds = ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE)
    if epoch is not None:
        # Batches per epoch do not depend on the order (each length bucket yields ceil(n / batch_size)).
        # Declaring the count lets Keras run exactly that many steps in every epoch; without it Keras
        # probes the first epoch of each fit() for its end, which costs an extra optimizer iteration
        # that a resumed run would spend at a different epoch.
        batches = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(tf.data.AUTOTUNE)
