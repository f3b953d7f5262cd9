"""Data stage (`make data`): read and validate a data directory's labelled text, split, tokenize, and write
data/processed/<run>/: vocab.txt, labels.txt, {train,dev,test}.tfrecord, {train,dev,test}.jsonl (the texts and
labels of each split as used), word_vectors.npz and stats.json. The readers are in pipeline/text/."""
import collections
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.core import manifest
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path, write_json, write_text
from pipeline.lm.runs import TOKENIZER, read_lm_text
from pipeline.lm.tokenizer import CharTokenizer, save_tokenizer
from pipeline.model import backbone
from pipeline.model.ngram import term_used
from pipeline.model.spec import encoder_length
from pipeline.text import tokenizer as tok
from pipeline.text import vectors
from pipeline.text.dataset import tokenize_split, write_tfrecord
from pipeline.text.processed import STAGE_VERSION, load_stats, processed_dir
from pipeline.text.read import read_table, read_texts, warn
from pipeline.text.splits import SPLITS, find_splits, find_unlabeled, sort_labels, stratified_split
from pipeline.text.sst2 import download_sst2
from pipeline.text.task import lm_files, resolve_task

LM_STAGE_VERSION = 1  # the language-model data stage's outputs


def run_data_stage(cfg, data_dir: str | None, run: str) -> dict:
    """Read, validate, split and tokenize a data directory into data/processed/<run>/; return stats."""
    t0 = time.time()
    check_config(cfg.data, run)
    out = processed_dir(cfg, run)
    src = source_dir(cfg, data_dir, out)
    if src is None:
        return load_stats(out)
    task = resolve_task(cfg.data.task, src)
    print(f"task: {task} (data.task {cfg.data.task})")
    if task == "lm":
        return run_lm_data_stage(cfg, src, out)
    # 1. Read and validate everything before writing anything (unless nothing changed since last time).
    inputs = find_inputs(cfg, src)
    key = stage_key(cfg, inputs)
    if manifest.up_to_date(out, "data", key):
        return load_stats(out)
    parsed = {split: read_table(path, cfg.data) for split, path in inputs.files.items()}
    unlabeled = read_texts(inputs.unlabeled, cfg.data) if inputs.unlabeled else []
    labels = check_labels(parsed, inputs.files)
    splits, sources = make_splits(parsed, inputs.files, cfg.data)
    # 2. Vocabulary from train and the unlabelled texts (never dev or test), then wordpieces of every
    # split (batched tf ops).
    vocab = vocabulary(cfg.data, inputs, splits, unlabeled)
    tokens = tokenize(vocab.tokens, splits, unlabeled, cfg.data.max_seq_len)
    # 3. Sequence length: a percentile of train lengths ([CLS] and [SEP] included), capped at data.max_seq_len
    # when the n-gram term reads it, else at what the encoder reads.
    seq_len, reach = sequence_length(cfg, inputs.backbone, tokens.lengths["train"], len(splits["train"][0]))
    stats = make_stats(cfg, src, inputs, parsed["train"], labels, sources, splits, unlabeled, vocab, tokens,
                       seq_len, reach)
    if vocab.vectors is not None:
        vocab.table, vocab.seen = vector_table(vocab, tokens)
        stats["word_vectors"] = vector_stats(inputs.word_vectors, vocab, tokens.ids)
    # 4. Write the run directory whole: it appears complete or not at all.
    write_run(out, key, labels, splits, unlabeled, vocab, tokens, seq_len, stats)
    _print_summary(out, stats, time.time() - t0)
    return stats


def check_config(dc, run):
    """A PipelineError for a bad run name or a data.* value out of range."""
    if not run or run in (".", "..") or "/" in run or "\\" in run:
        raise PipelineError(f"invalid run name {run!r}")
    if dc.max_seq_len < 8:
        raise PipelineError(f"data.max_seq_len must be at least 8, got {dc.max_seq_len}")
    if dc.vector_words < 0:
        raise PipelineError(f"data.vector_words must be 0 or more, got {dc.vector_words}")
    if not 0 < dc.length_percentile <= 100:
        raise PipelineError(f"data.length_percentile must be in (0, 100], got {dc.length_percentile}")


def source_dir(cfg, data_dir, out) -> Path | None:
    """--data, else the directory this run was made from, else the GLUE SST-2 download; None when the run's
    directory is gone (the run stays as it was made)."""
    if data_dir is not None:
        return Path(data_dir)
    raw = Path(cfg.paths.data) / "raw"
    src = Path(load_stats(out)["source"]) if (out / "stats.json").is_file() else raw / "SST-2"
    if src.resolve() == (raw / "SST-2").resolve():
        return download_sst2(raw)
    if not src.is_dir():
        print(f"data: up to date ({src} is gone; {out} stays as it was made; --data DIR to remake it)")
        return None
    return src


def find_inputs(cfg, src):
    """The files the stage reads: the splits, unlabelled texts, the backbone's directory (its vocabulary) and the
    word vectors file ("none" with a backbone: its embeddings already know the words)."""
    pretrained = backbone.configured_dir(cfg)
    return SimpleNamespace(files=find_splits(src), unlabeled=find_unlabeled(src), backbone=pretrained,
                           word_vectors="none" if pretrained else cfg.data.word_vectors)


def stage_key(cfg, inputs):
    """What the processed run depends on: data.*, what the encoder and the n-gram term read (it decides seq_len),
    the stage's version and every input file's checksum."""
    m, word_vectors = cfg.model, inputs.word_vectors
    vector_file = [Path(word_vectors)] if word_vectors != "none" else []
    unlabeled_file = [inputs.unlabeled] if inputs.unlabeled else []
    key = {"config": {"data": {**cfg.to_dict()["data"], "word_vectors": word_vectors},
                      "model": {k: getattr(m, k) for k in ("max_encoder_len", "ngram_order", "ngram_max_rows")},
                      **manifest.version_config("data", STAGE_VERSION)},
           "inputs": manifest.files_checksums([*inputs.files.values(), *unlabeled_file, *vector_file])}
    if inputs.backbone:
        key["inputs"]["backbone vocab.txt"] = manifest.sha256(inputs.backbone / "vocab.txt")
    return key


def check_labels(parsed, files) -> list[str]:
    """The train split's labels in id order; a PipelineError for fewer than two classes, a class with one example,
    or a dev/test label that train does not have."""
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
    for split in ("dev", "test"):
        if split in parsed:
            p = parsed[split]
            for l, line in zip(p["labels"], p["lines"]):
                if l not in labels:
                    raise PipelineError(f"{files[split].name}:{line}: label '{l}' does not occur in "
                                        f"{files['train'].name} (labels: {', '.join(labels)})")
    return labels


def make_splits(parsed, files, dc):
    """({split: (texts, labels)}, {split: where it came from}): the files' splits, with a stratified dev hold-out
    of train when there is no dev file; warns about dev and test texts that train has too."""
    splits = {s: (p["texts"], p["labels"]) for s, p in parsed.items()}
    sources = {s: files[s].name for s in files}
    if "dev" not in splits:
        keep, held = stratified_split(parsed["train"]["labels"], dc.dev_fraction, dc.seed)
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
    return splits, sources


def vocabulary(dc, inputs, splits, unlabeled):
    """The run's tokens (the backbone's, or learned from train and unlabelled texts; then the words with a vector),
    the learned vocabulary's size, and the words' vectors (None without)."""
    if inputs.backbone:
        vocab = tok.load_vocabulary(inputs.backbone / "vocab.txt")
        print(f"vocabulary: the backbone's ({inputs.backbone / 'vocab.txt'}, {len(vocab):,} tokens); no word vectors")
    else:
        max_chars = dc.max_seq_len * tok.CHARS_PER_TOKEN
        vocab = tok.learn_vocabulary([t[:max_chars] for t in splits["train"][0] + unlabeled], dc.vocab_size)
    out = SimpleNamespace(tokens=vocab, learned=len(vocab), words=None, vectors=None)
    if inputs.word_vectors != "none":
        out.words, out.vectors = vectors.read_vectors_file(inputs.word_vectors)
        out.tokens = vectors.extend_vocabulary(vocab, out.words, dc.vector_words)
    return out


def tokenize(vocab, splits, unlabeled, max_seq_len):
    """Wordpiece ids of every split and of the unlabelled texts, their lengths with [CLS] and [SEP], and the
    fraction of wordpieces (before truncation) that are [UNK]."""
    max_chars = max_seq_len * tok.CHARS_PER_TOKEN
    tokenizer = tok.make_tokenizer(vocab)
    unk_id, cls_id, sep_id = (tokenizer.token_to_id(t) for t in (tok.UNK, tok.CLS, tok.SEP))
    ids = {s: tokenize_split(tokenizer, texts, max_chars) for s, (texts, _) in splits.items()}
    return SimpleNamespace(
        tokenizer=tokenizer, cls_id=cls_id, sep_id=sep_id, ids=ids,
        unlabeled=tokenize_split(tokenizer, unlabeled, max_chars) if unlabeled else None,
        lengths={s: r.row_lengths().numpy() + 2 for s, r in ids.items()},
        oov={s: float((r.flat_values.numpy() == unk_id).sum()) / max(1, r.flat_values.shape[0])
             for s, r in ids.items()})


def sequence_length(cfg, pretrained, train_lengths, train_rows):
    """(seq_len, the wordpieces the encoder reads): a percentile of train lengths, capped at data.max_seq_len
    when the n-gram term reads the text, else at what the encoder reads."""
    dc, m = cfg.data, cfg.model
    pct = float(np.percentile(train_lengths, dc.length_percentile))
    reach = encoder_length(m, dc.max_seq_len, backbone.read_spec(pretrained) if pretrained else None)
    cap = dc.max_seq_len if term_used(m, train_rows) else reach
    return int(max(8, min(cap, math.ceil(pct)))), reach


def make_stats(cfg, src, inputs, train, labels, sources, splits, unlabeled, vocab, tokens, seq_len, reach) -> dict:
    """stats.json: where the data came from, rows and classes per split, lengths, vocabulary and OOV rates."""
    label_id = {l: i for i, l in enumerate(labels)}
    lengths = tokens.lengths
    return {
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
        "length_percentile": cfg.data.length_percentile,
        "vocab_size": len(vocab.tokens),
        "word_vectors": None,
        "backbone": cfg.model.backbone if inputs.backbone else None,
        "oov_rate": {s: round(v, 6) for s, v in tokens.oov.items()},
        "truncated_fraction": {s: round(float((lengths[s] > seq_len).mean()), 6) for s in splits},
        "unlabeled": {"file": inputs.unlabeled.name, "rows": len(unlabeled)} if inputs.unlabeled else None,
    }


def vector_table(vocab, tokens):
    """(a fixed vector per token [V, dim], whether a training text (train, unlabelled) has each token [V])."""
    table = vectors.vector_table(vocab.tokens, vocab.words, vocab.vectors)
    # what training can learn from: train and the unlabelled texts
    texts = [tokens.ids["train"]] + ([tokens.unlabeled] if tokens.unlabeled is not None else [])
    seen = np.bincount(np.concatenate([r.flat_values.numpy() for r in texts]), minlength=len(vocab.tokens)) > 0
    seen[[tokens.tokenizer.token_to_id(tok.PAD), tokens.cls_id, tokens.sep_id]] = True  # in every model input
    return table, seen


def vector_stats(source, vocab, ids) -> dict:
    """stats.json's word_vectors: their file and width, the vocabulary they extend, the tokens that have one and
    the share of dev and test wordpieces that no training text has."""
    has = vocab.table.any(axis=1)
    return {"source": source, "dim": int(vocab.table.shape[1]), "learned_tokens": vocab.learned,
            "added_words": len(vocab.tokens) - vocab.learned, "tokens_with_vectors": int(has.sum()),
            "unseen_tokens": {s: _unseen_share(ids[s], vocab.seen) for s in ("dev", "test") if s in ids}}


def write_run(out, key, labels, splits, unlabeled, vocab, tokens, seq_len, stats):
    """data/processed/<run>/ written whole, with its manifest: it appears complete or not at all."""
    label_id = {l: i for i, l in enumerate(labels)}
    cls_id, sep_id = tokens.cls_id, tokens.sep_id
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tok.save_vocabulary(vocab.tokens, tmp / "vocab.txt")
        write_text(tmp / "labels.txt", "".join(f"{l}\n" for l in labels))
        for s, (texts, labs) in splits.items():
            write_tfrecord(tmp / f"{s}.tfrecord", tokens.ids[s], [label_id[l] for l in labs], seq_len, cls_id, sep_id)
            _write_jsonl(tmp / f"{s}.jsonl", texts, labs)
        if unlabeled:  # for make pretrain; label -1: no label
            write_tfrecord(tmp / "unlabeled.tfrecord", tokens.unlabeled, [-1] * len(unlabeled), seq_len, cls_id, sep_id)
        if vocab.vectors is not None:
            vectors.save_word_vectors(tmp / vectors.FILE_NAME, vocab.table, vocab.seen, vocab.learned)
        write_json(tmp / "stats.json", stats)
        manifest.record(tmp, "data", key, sorted(p.name for p in tmp.iterdir()))


# ---------------------------------------------------------------- a language-model run (data.task lm)


def run_lm_data_stage(cfg, src, out) -> dict:
    """A directory of plain text: check it, learn the character vocabulary from train.txt and write
    data/processed/<run>/ (the texts as read, tokenizer.json, stats.json and the manifest)."""
    t0 = time.time()
    found = lm_files(src)
    key = {"config": {"data": {"task": "lm"}, "lm": {"context": cfg.lm.context},
                      **manifest.version_config("data", LM_STAGE_VERSION)},
           "inputs": manifest.files_checksums(found.values())}
    if manifest.up_to_date(out, "data", key):
        return load_stats(out)
    texts = {split: read_lm_text(path) for split, path in found.items()}
    tokenizer = CharTokenizer.fit(texts["train"])
    check_lm_lengths(found, texts, cfg.lm.context)
    stats = lm_stats(src, found, texts, tokenizer, cfg.lm.context)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split, text in texts.items():
            write_text(tmp / f"{split}.txt", text)
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        write_json(tmp / "stats.json", stats)
        manifest.record(tmp, "data", key, sorted(p.name for p in tmp.iterdir()))
    chars = ", ".join(f"{s} {n:,}" for s, n in stats["characters"].items())
    unknown = ", ".join(f"{s} {r:.3%}" for s, r in stats["unknown_rate"].items())
    print(f"data: {stats['source']} -> {out}")
    print(f"  characters: {chars}")
    print(f"  vocab: {stats['vocab_size']} tokens (the characters of train, and one for any other); "
          f"characters not in it: {unknown}")
    print(f"  done in {time.time() - t0:.0f}s")
    return stats


def check_lm_lengths(found, texts, context):
    """A PipelineError naming the file when train cannot fill one window, or dev/test has nothing to predict."""
    if len(texts["train"]) < context + 1:
        raise PipelineError(f"{found['train']}: {len(texts['train'])} characters, too short for one window of "
                            f"{context} (+1 to predict; lm.context)")
    for split in ("dev", "test"):
        if split in texts and len(texts[split]) < 2:
            raise PipelineError(f"{found[split]}: {len(texts[split])} character, too short to score")


def lm_stats(src, found, texts, tokenizer, context) -> dict:
    """stats.json of a language-model run: its task, files, characters and the unknown-character rates."""
    known = set(tokenizer.chars)
    return {"task": "lm", "source": str(Path(src).resolve()), "files": {s: p.name for s, p in found.items()},
            "characters": {s: len(t) for s, t in texts.items()}, "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "context": context,
            "unknown_rate": {s: round(sum(c not in known for c in t) / len(t), 6)
                             for s, t in texts.items() if s != "train"}}


def _write_jsonl(path, texts, labels):
    write_text(path, "".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n"
                             for t, l in zip(texts, labels)))


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
