"""The splits of a data directory: which files they are, the labels' order, and a stratified dev hold-out."""
import re
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.text.read import FORMATS

SPLITS = ("train", "dev", "test")


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
