"""Read a data file (.tsv, .csv, .jsonl) into validated texts and labels; errors name the file and line.

Headers are optional and columns not named as configured are chosen by content (pipeline/text/columns.py).
"""
import collections
import csv
import io
import json
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.text.columns import choose_columns, either, looks_like_header

FORMATS = (".tsv", ".csv", ".jsonl")
IMBALANCE_RATIO = 3.0  # warn when the largest class is this many times the smallest

# csv refuses fields over 128 KiB by default; a long text is legal (the tokenizer cuts it).
csv.field_size_limit(1 << 30)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def read_table(path, data_cfg, require_labels=True) -> dict:
    """Parse and validate one file: dict(texts, labels, lines, text_column, label_column, header).

    labels is None for an unlabelled file (allowed only with require_labels=False); lines holds each
    example's line number for messages; header is True when the first row named the columns.
    Columns not named as configured are chosen by content (columns.choose_columns). Raises PipelineError
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


def read_examples(path, data_cfg, *, require_labels=True) -> tuple[list[str], list[str]]:
    """Read a .tsv/.csv/.jsonl file into (texts, label strings); PipelineError names file:line.

    With require_labels=False an unlabelled file (one headerless column) gives an empty label list.
    """
    out = read_table(path, data_cfg, require_labels)
    return out["texts"], out["labels"] or []


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
    header = any(f in configured for f in first) or looks_like_header(first, rows[1:])
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
    text_i, label_i = choose_columns(name, head_line, names, columns, data_cfg, require_labels, header)

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
            text_i, label_i = choose_columns(name, objs[0][0], keys, columns, data_cfg, False, True)
            text_keys.append(keys[text_i])
            if label_i is not None:
                label_keys.append(keys[label_i])

    texts, labels, lines = [], [], []
    text_cols, label_cols = set(), set()
    for line, obj in objs:
        key = next((k for k in text_keys if k in obj), None)
        if key is None:
            raise PipelineError(f"{name}:{line}: missing text field {either(data_cfg.text_column, 'text')}")
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
            raise PipelineError(f"{name}:{line}: missing label field {either(data_cfg.label_column, 'label')}")
    if labels and len(labels) != len(texts):  # labels start only after some unlabelled lines
        raise PipelineError(f"{name}:{lines[0]}: missing label field '{data_cfg.label_column}'")
    return dict(texts=texts, labels=labels if labels else None, lines=lines, header=False,
                text_column="/".join(sorted(text_cols)), label_column="/".join(sorted(label_cols)) or None)


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
