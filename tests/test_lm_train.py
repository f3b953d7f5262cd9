"""train_lm on a tiny repetitive text: it learns (dev bits per character far under uniform), writes its files
and TensorBoard scalars, refuses a text too short for one window, and resumes an interrupted run."""
import dataclasses
import json
import math

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.lm.config import LMConfig
from pipeline.lm.model import load_lm
from pipeline.lm.tokenizer import load_tokenizer
from pipeline.lm.train import train_lm

VERSE = "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
CFG = LMConfig(context=32, d_model=32, num_heads=2, num_layers=1, ff_dim=64, dropout=0.0, batch_size=16,
               steps=120, learning_rate=0.01, warmup_steps=10, log_every=20, eval_every=60, eval_chars=400,
               mixed_precision="float32", ngram_order=0)


def test_train_lm_learns_and_writes_its_files(tmp_path):
    model, tok, metrics = train_lm(CFG, VERSE * 40, VERSE * 3, tmp_path / "out", log_dir=tmp_path / "tb")
    uniform = math.log2(tok.vocab_size)
    assert metrics["dev"]["bits_per_char"] < 0.5 * uniform
    assert metrics["steps"] == 120 and metrics["steps_per_second"] > 0
    out = tmp_path / "out"
    assert load_tokenizer(out / "tokenizer.json").encode(VERSE) == tok.encode(VERSE)
    assert json.loads((out / "config.json").read_text())["steps"] == 120
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history] == [60, 120] and history[1]["dev_bits_per_char"] < uniform
    reloaded = load_lm(out / "model.keras")
    ids = tf.constant([tok.encode(VERSE[:32])])
    assert float(tf.reduce_max(tf.abs(reloaded(ids) - model(ids)))) < 1e-5
    events = EventAccumulator(str(tmp_path / "tb" / "steps")).Reload()
    tags = set(events.Tags()["tensors"])
    assert {"loss", "perplexity", "bits_per_char", "learning_rate", "dev/bits_per_char"} <= tags
    steps = [e.step for e in events.Tensors("loss")]
    assert steps == [20, 40, 60, 80, 100, 120]
    lr = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("learning_rate")]
    assert lr[0] > lr[-1] >= 0  # decays after the warmup


def test_train_lm_refuses_a_short_text(tmp_path):
    with pytest.raises(ValueError, match="^tiny.txt: 12 tokens, too short for one window of 32"):
        train_lm(CFG, "twelve chars", "", tmp_path, name="tiny.txt")


def test_ngram_table_starts_from_counts(tmp_path):
    """Two steps at a tiny learning rate: a model whose n-gram table starts from counts already predicts the
    verse (the Kneser-Ney bigram's level), one starting from zeros is still near uniform."""
    dev = {}
    for init in ("counts", "zeros"):
        cfg = LMConfig(**{**CFG.__dict__, "steps": 2, "eval_every": 2, "learning_rate": 1e-6, "ngram_order": 3,
                          "ngram_buckets": 1009, "ngram_init": init})
        dev[init] = train_lm(cfg, VERSE * 40, VERSE * 3, tmp_path / init)[2]["dev"]["bits_per_char"]
    assert dev["counts"] < 1.5 < 3.5 < dev["zeros"]


class Killed(Exception):
    """The process dying mid-run."""


SHORT = dataclasses.replace(CFG, steps=40, eval_every=20)


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """Killed after its first checkpoint (step 20 of 40), a rerun continues there and ends where an
    uninterrupted run ends."""
    from pipeline.lm import train

    _, _, whole = train_lm(SHORT, VERSE * 40, VERSE * 3, tmp_path / "whole")
    saved = train.Checkpointing.on_epoch_end

    def save_then_die(self, epoch, logs=None):
        saved(self, epoch, logs)
        raise Killed  # as a killed process: nothing after the checkpoint runs

    monkeypatch.setattr(train.Checkpointing, "on_epoch_end", save_then_die)
    with pytest.raises(Killed):
        train_lm(SHORT, VERSE * 40, VERSE * 3, tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint" / "progress.json").is_file()
    assert not (tmp_path / "out" / "model.keras").exists()
    monkeypatch.setattr(train.Checkpointing, "on_epoch_end", saved)
    capsys.readouterr()
    _, _, resumed = train_lm(SHORT, VERSE * 40, VERSE * 3, tmp_path / "out")
    assert "resuming from the checkpoint at step 20" in capsys.readouterr().out
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [row["step"] for row in history] == [20, 40]
    assert abs(resumed["dev"]["bits_per_char"] - whole["dev"]["bits_per_char"]) < 1e-3
    assert not (tmp_path / "out" / "checkpoint").exists()  # finished: removed


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, monkeypatch, capsys):
    from pipeline.lm import train

    saved = train.Checkpointing.on_epoch_end

    def save_then_die(self, epoch, logs=None):
        saved(self, epoch, logs)
        raise Killed

    monkeypatch.setattr(train.Checkpointing, "on_epoch_end", save_then_die)
    with pytest.raises(Killed):
        train_lm(SHORT, VERSE * 40, VERSE * 3, tmp_path)
    monkeypatch.setattr(train.Checkpointing, "on_epoch_end", saved)
    capsys.readouterr()
    other = dataclasses.replace(SHORT, learning_rate=0.005)
    train_lm(other, VERSE * 40, VERSE * 3, tmp_path)
    assert "resuming" not in capsys.readouterr().out
    assert [row["step"] for row in json.loads((tmp_path / "history.json").read_text())] == [20, 40]
