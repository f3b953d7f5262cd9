"""Shared test setup: import the package first so tf.keras resolves to tf-keras; tiny data and config."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

POSITIVE = ["good", "great", "fine", "lovely", "superb", "warm", "funny", "clever"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "tired", "ugly"]
FILLER = ["the", "movie", "film", "a", "was", "is", "plot", "actors", "story", "very", "and", "it"]

# A tiny model and vocabulary: the whole train stage runs in seconds.
TINY = [
    "data.vocab_size=120", "data.word_vectors=none", "model.d_model=16", "model.num_layers=1", "model.num_heads=2",
    "model.ff_dim=32", "model.dropout=0.0", "train.epochs=3", "train.batch_size=16",
    "train.learning_rate=0.005", "train.warmup_fraction=0.0", "train.min_steps=0", "model.ngram_buckets=1024",
    "model.backbone=none", "train.mixed_precision=float32",  # tests download nothing; bfloat16: its own test
    "model.ngram_order=3",
]


def make_toy_split(path, n, seed):
    """Write a separable sentiment TSV: a label-bearing word among filler words."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        lines.append(" ".join(words) + f"\t{label}")
    path.write_text("\n".join(lines) + "\n")


def make_toy_dir(parent):
    """parent/toy: a data directory with train.tsv (400 rows) and dev.tsv (80 rows)."""
    d = parent / "toy"
    d.mkdir()
    make_toy_split(d / "train.tsv", 400, 0)
    make_toy_split(d / "dev.tsv", 80, 1)
    return d


@pytest.fixture
def toy_data(tmp_path):
    return make_toy_dir(tmp_path)


def tiny_overrides(root, *extra):
    """--set overrides that send every output under `root` and make the model tiny."""
    paths = [f"paths.data={root}/data", f"paths.models={root}/saved_models", f"paths.runs={root}/runs"]
    return paths + TINY + list(extra)


# Short fine-tuning and calibration: the tiny run has 25 batches per epoch.
COMPRESS = ["compress.prune_epochs=2", "compress.qat_epochs=1", "compress.calibration_samples=50",
            "compress.sparsity=0.75", "compress.learning_rate=0.001"]


ROOT = Path(__file__).resolve().parents[1]


def sets(overrides):
    """--set overrides as CLI arguments."""
    return [a for o in overrides for a in ("--set", o)]


def cli(*args, **kwargs):
    """The CLI in a subprocess, as a user runs it: CompletedProcess with text stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          **kwargs)


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of the CLI run in this process."""
    from pipeline.__main__ import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def sigkill(proc, too_late):
    """SIGKILL the still-running subprocess `proc` and reap it; fail with `too_late` if it already ended."""
    assert proc.poll() is None, too_late
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# Words the toy data never uses, each with a vector beside the toy words of its sentiment.
UNSEEN_POSITIVE = ["splendid", "brilliant", "wonderful"]
UNSEEN_NEGATIVE = ["dreadful", "terrible", "horrible"]


def make_vectors_file(path, dim=8, seed=0):
    """A GloVe-style text file: positive words (toy and unseen) near +v, negative ones near -v, filler words
    random; plus lines the vocabulary must skip (punctuation, upper case)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=dim)
    vectors = {w: rng.normal(size=dim) for w in FILLER + [".", "Great"]}
    vectors.update({w: v + 0.3 * rng.normal(size=dim) for w in POSITIVE + UNSEEN_POSITIVE})
    vectors.update({w: -v + 0.3 * rng.normal(size=dim) for w in NEGATIVE + UNSEEN_NEGATIVE})
    path.write_text("".join(f"{w} {' '.join(f'{x:.5f}' for x in vec)}\n" for w, vec in vectors.items()))
    return path
