"""Training stage: files written, learning, resume after SIGKILL, mirrored strategy, LR schedule."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, cli, make_toy_split, sets, sigkill, tiny_overrides
from pipeline.core.config import load_config


def test_warmup_linear_decay_schedule():
    from pipeline.model.training import WarmupLinearDecay

    s = WarmupLinearDecay(1.0, warmup_steps=10, total_steps=110)
    values = [float(s(step)) for step in (0, 4, 9, 10, 60, 110, 200)]
    assert values == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert WarmupLinearDecay(**s.get_config()).get_config() == s.get_config()


def test_best_in_log_rebuilds_early_stopping_state():
    from pipeline.model.training import best_in_log

    rows = [{"epoch": 0, "val_loss": 0.9}, {"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.6},
            {"epoch": 3, "val_loss": 0.7}]
    assert best_in_log(rows, "val_loss", lambda a, b: a < b) == (0.5, 1, 2)
    assert best_in_log([], "val_loss", lambda a, b: a < b) == (None, 0, 0)


def test_train_stage_writes_a_model_that_learns(toy_data, tmp_path):
    from pipeline.stages.data import run_data_stage
    from pipeline.measure.predictors import load_predictor
    from pipeline.stages.train import run_train_stage

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "train.epochs=6"))
    run_data_stage(cfg, str(toy_data), "toy")
    metrics = run_train_stage(cfg, "toy")

    model_dir = tmp_path / "saved_models" / "toy"
    for name in ("model.keras", "saved_model/saved_model.pb", "vocab.txt", "labels.txt", "preprocess.json",
                 "config.yaml", "metrics.json", "history.json"):
        assert (model_dir / name).exists(), name
    assert metrics["dev"]["accuracy"] > 0.9  # the toy task is separable by one word
    assert json.loads((model_dir / "metrics.json").read_text())["dev"]["accuracy"] == metrics["dev"]["accuracy"]
    history = json.loads((model_dir / "history.json").read_text())
    assert [int(r["epoch"]) for r in history] == list(range(len(history)))
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "epoch_seconds"} <= set(history[0])
    assert list((tmp_path / "runs" / "toy" / "train").rglob("events.out.tfevents.*"))

    # The saved model reloads and predicts like the in-memory one did on dev.
    predictor = load_predictor(model_dir)
    probs = predictor.predict_proba(["the movie was great", "the movie was awful"])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert predictor.labels[int(np.argmax(probs[0]))] == "1" and predictor.labels[int(np.argmax(probs[1]))] == "0"

    # The n-gram term was fitted and folded in: the saved model gives the combined dev score recorded, and
    # the baseline was fitted on the same rows and scored by the same code.
    mix = metrics["ngrams"]
    assert mix["ngram_weight"] > 0 and mix["dev"]["combined"]["accuracy"] == metrics["dev"]["accuracy"]
    assert np.any(predictor.model.get_layer("ngrams").get_weights()[0] != 0)
    assert metrics["baseline"]["dev"]["n"] == metrics["dev"]["n"] and metrics["baseline"]["bytes"] > 0
    assert load_predictor(model_dir / "baseline").predict_proba(["the movie was great"]).shape == (1, 2)


def test_small_data_gets_enough_steps_and_rare_classes_weigh_more():
    from pipeline.core.config import TrainConfig
    from pipeline.model.training import class_weights, epochs_for, step_limit, steps_for

    assert epochs_for(TrainConfig(epochs=3, min_steps=1500, max_steps=0), 50) == 30  # 3 epochs of 50 steps: too few
    assert epochs_for(TrainConfig(epochs=3, min_steps=1500, max_steps=0), 800) == 3
    # train.max_steps ends a large data set's training mid-epoch
    assert (epochs_for(TrainConfig(epochs=3, min_steps=0, max_steps=1000), 800),
            steps_for(TrainConfig(epochs=3, min_steps=0, max_steps=1000), 800)) == (2, 1000)
    assert steps_for(TrainConfig(epochs=3, min_steps=0, max_steps=1000), 200) == 600
    # train.max_tokens: long texts get fewer steps, short ones are held by max_steps
    assert step_limit(TrainConfig(max_steps=600, max_tokens=800_000), 500.0) == 50
    assert step_limit(TrainConfig(max_steps=600, max_tokens=800_000), 12.0) == 600
    assert step_limit(TrainConfig(max_steps=0, max_tokens=800_000), 12.0) == 2083
    assert step_limit(TrainConfig(max_steps=0, max_tokens=0), 500.0) == 0
    assert step_limit(TrainConfig(max_steps=600, max_tokens=1), 500.0) == 1
    weights = class_weights({"a": 60, "b": 30, "c": 10}, ["a", "b", "c"])
    assert weights == pytest.approx({0: 100 / 180, 1: 100 / 90, 2: 100 / 30})
    assert sum(weights[i] * n for i, n in enumerate((60, 30, 10))) == pytest.approx(100)  # same total weight


def test_max_steps_stops_training_mid_epoch(toy_data, tmp_path, capsys):
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "train.epochs=6", "train.max_steps=30"))
    run_data_stage(cfg, str(toy_data), "toy")  # 400 rows: 25 steps per epoch
    metrics = run_train_stage(cfg, "toy")
    assert "training 2 epochs at most (30 steps;" in capsys.readouterr().out
    assert metrics["epochs"] == 2  # the second epoch stopped after 5 of its steps, then was evaluated
    history = json.loads((tmp_path / "saved_models" / "toy" / "history.json").read_text())
    assert len(history) == 2 and "val_loss" in history[1]


def test_step_budget_stops_mid_epoch():
    import tensorflow as tf

    from pipeline.model.training import StepBudget

    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(3,))])
    model.compile("adam", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((100, 3)), np.zeros(100))).batch(4)  # 25 steps per epoch
    model.fit(data, epochs=3, callbacks=[StepBudget(32)], verbose=0)
    assert int(model.optimizer.iterations) == 32


def test_a_model_trained_in_mixed_precision_is_saved_in_float32(toy_data, tmp_path):
    from pipeline.stages.data import run_data_stage
    from pipeline.model.build import load_model
    from pipeline.stages.train import run_train_stage

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "train.mixed_precision=mixed_bfloat16",
                                                           "train.epochs=6"))
    run_data_stage(cfg, str(toy_data), "toy")
    metrics = run_train_stage(cfg, "toy")
    assert metrics["dev"]["accuracy"] > 0.9
    model = load_model(tmp_path / "saved_models" / "toy" / "model.keras")
    assert {layer.compute_dtype for layer in model.layers if layer.weights} == {"float32"}


def test_same_seed_gives_same_metrics(toy_data, tmp_path):
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    results = []
    for name in ("a", "b"):
        # The plain block (no convolution) here; the default one trains in the test above.
        cfg = load_config(None, tiny_overrides(tmp_path / name, "train.epochs=2", "model.dropout=0.1",
                                               "model.conv_width=0"))
        run_data_stage(cfg, str(toy_data), "toy")
        run_train_stage(cfg, "toy")
        results.append((tmp_path / name / "saved_models" / "toy" / "metrics.json").read_bytes())
    assert results[0] == results[1]  # the whole file, byte for byte


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_rerun_resumes(tmp_path):
    data = tmp_path / "big"
    data.mkdir()
    make_toy_split(data / "train.tsv", 3000, 0)  # enough steps per epoch to be killed inside one
    make_toy_split(data / "dev.tsv", 200, 1)
    overrides = sets(tiny_overrides(tmp_path, "train.epochs=2", "train.batch_size=8", "train.patience=10",
                                    "model.dropout=0.1"))
    assert cli("data", "--data", str(data), "--run", "big", *overrides).returncode == 0

    state = tmp_path / "saved_models" / "big" / "train_state"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--run", "big", *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = state / "epochs.csv"
        if log.exists() and len(log.read_text().strip().splitlines()) >= 2 and (state / "backup").exists():
            time.sleep(0.5)  # now inside the second epoch
            break
        time.sleep(0.2)
    sigkill(proc, "training finished before it could be killed; make the epoch longer")
    assert not (tmp_path / "saved_models" / "big" / "metrics.json").exists()
    done_before = len((state / "epochs.csv").read_text().strip().splitlines()) - 1

    again = cli("train", "--run", "big", *overrides, timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    assert f"Epoch {done_before + 1}/2" in again.stdout and "Epoch 1/2" not in again.stdout
    history = json.loads((tmp_path / "saved_models" / "big" / "history.json").read_text())
    assert [int(r["epoch"]) for r in history] == [0, 1]
    metrics = json.loads((tmp_path / "saved_models" / "big" / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] > 0.9

    # The same as an uninterrupted run: same shuffle order and dropout stream after the restart.
    clean = tmp_path / "clean"
    overrides = sets(tiny_overrides(clean, "train.epochs=2", "train.batch_size=8", "train.patience=10",
                                    "model.dropout=0.1"))
    shutil.copytree(tmp_path / "data", clean / "data")  # the same processed data (its manifest is relative)
    assert cli("train", "--run", "big", *overrides, timeout=400).returncode == 0
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert untimed(json.loads((clean / "saved_models" / "big" / "history.json").read_text())) == untimed(history)
    expected = json.loads((clean / "saved_models" / "big" / "metrics.json").read_text())
    assert expected["dev"] == metrics["dev"] and expected["best_epoch"] == metrics["best_epoch"]


@pytest.mark.e2e
def test_mirrored_strategy_on_two_logical_cpus(toy_data, tmp_path):
    script = f"""
import pipeline, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.core.config import load_config
from pipeline.stages.data import run_data_stage
from pipeline.stages.train import run_train_stage
cfg = load_config(None, {tiny_overrides(tmp_path, "train.strategy=mirrored", "train.epochs=3")!r})
run_data_stage(cfg, {str(toy_data)!r}, "toy")
m = run_train_stage(cfg, "toy")
print("replicas", tf.distribute.MirroredStrategy().num_replicas_in_sync, "accuracy", m["dev"]["accuracy"])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("replicas")][-1].split()
    assert line[1] == "2" and float(line[3]) > 0.9


def read_scalars(logdir):
    """{tag: [(step, value), ...]} of every TensorBoard event file under logdir."""
    out = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    return out


def test_step_log_draws_each_window_of_steps_as_a_point(tmp_path):
    """TensorBoard gets a point every `every` steps: the mean loss of exactly those steps and the learning rate."""
    from pipeline.model.training import StepLog, WarmupLinearDecay

    x = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(1,))])
    model.compile(tf.keras.optimizers.SGD(WarmupLinearDecay(0.1, 0, 16)), loss="mse")

    class PerStep(tf.keras.callbacks.Callback):  # each step's own loss, from Keras' running mean
        def on_train_batch_end(self, batch, logs=None):
            losses.append(logs["loss"] * (batch + 1) - sum(losses))

    losses = []
    model.fit(x, 3 * x, batch_size=4, epochs=1, shuffle=False, verbose=0,
              callbacks=[PerStep(), StepLog(tmp_path, every=5)])
    scalars = read_scalars(tmp_path / "steps")
    assert [s for s, _ in scalars["loss"]] == [5, 10, 15]  # 16 steps: a point after each 5
    np.testing.assert_allclose([v for _, v in scalars["loss"]],
                               [np.mean(losses[0:5]), np.mean(losses[5:10]), np.mean(losses[10:15])], rtol=1e-4)
    # the rate the window's last step took (step s - 1 counted from 0)
    np.testing.assert_allclose([v for _, v in scalars["learning_rate"]],
                               [0.1 * (16 - (s - 1)) / 16 for s in (5, 10, 15)], rtol=1e-5)
