"""Differentially private training (train.privacy): per-example clipping bounds one example's influence, ε as
dp-accounting's accountant gives it, the noise for a target ε, config checks, and a private train run's record."""
import json

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, tiny_overrides

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.measure.privacy import epsilon, noise_for_epsilon, privacy_fact, privacy_markdown
from pipeline.model.privacy import make_dp_optimizer, per_example_loss


def dp_gradient(xs, clip, microbatches=0, noise=0.0):
    """The DP optimizer's gradient of the per-example losses w·x_i (each example's gradient is x_i)."""
    w = tf.Variable(np.zeros(xs.shape[1], np.float32))
    optimizer = make_dp_optimizer(0.1, clip, noise, microbatches)
    with tf.GradientTape(persistent=True) as tape:
        losses = tf.linalg.matvec(tf.constant(xs), w)
    # the method tf-keras' Model.train_step reaches through optimizer.minimize(loss, vars, tape=tape)
    (grad, _), = optimizer._compute_gradients(losses, [w], tape=tape)
    return grad.numpy()


def test_clipping_caps_one_huge_example_at_clip_over_batch():
    clip, batch = 1.0, 4
    small = np.array([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.2, 0.0, 0.2]], np.float32)  # norms below the clip
    huge = np.array([[1000.0, 0.0, 0.0]], np.float32)
    with_huge = dp_gradient(np.concatenate([huge, small]), clip)
    without = dp_gradient(np.concatenate([np.zeros_like(huge), small]), clip)
    # the small ones pass unclipped; the huge one counts as its direction times the clip, over the batch
    np.testing.assert_allclose(with_huge, (np.array([clip, 0, 0]) + small.sum(0)) / batch, rtol=1e-6)
    assert np.linalg.norm(with_huge - without) == pytest.approx(clip / batch, rel=1e-6)


def test_microbatches_clip_each_microbatch_mean():
    xs = np.array([[4.0, 0.0], [0.0, 0.0], [0.0, 0.5], [0.0, 0.5]], np.float32)
    # two microbatches: means (2, 0) -> clipped to (1, 0), and (0, 0.5) kept; the gradient is their mean
    np.testing.assert_allclose(dp_gradient(xs, 1.0, microbatches=2), [0.5, 0.25], rtol=1e-6)


def test_noise_has_the_promised_scale():
    xs = np.zeros((8, 4000), np.float32)
    grad = dp_gradient(xs, clip=2.0, noise=1.5)
    assert np.std(grad) == pytest.approx(1.5 * 2.0 / 8, rel=0.05)  # noise_multiplier * clip / batch


def test_per_example_loss_keeps_one_value_per_example():
    y = tf.one_hot([0, 1, 1], 2)
    p = tf.constant([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    losses = per_example_loss(0.1)(y, p)
    assert losses.shape == (3,)
    assert float(tf.reduce_mean(losses)) == pytest.approx(
        float(tf.keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y, p)), rel=1e-6)


def test_epsilon_grows_with_steps_and_is_the_accountants():
    q, noise, delta = 256 / 60000, 1.1, 1 / 60000
    values = [epsilon(noise, q, steps, delta) for steps in (20, 1000, 5000)]
    assert values[0] < values[1] < values[2]
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(20):  # step by step, as training composes them
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)))
    assert values[0] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert epsilon(0.0, q, 10, delta) == float("inf")


def test_target_epsilon_gives_the_smallest_noise_meeting_it():
    q, steps, delta = 128 / 20000, 800, 1 / 20000
    for target in (1.0, 8.0):
        noise = noise_for_epsilon(target, q, steps, delta)
        assert epsilon(noise, q, steps, delta) <= target
        assert epsilon(noise - 0.01, q, steps, delta) > target  # not more noise than needed
    assert noise_for_epsilon(1.0, q, steps, delta) > noise_for_epsilon(8.0, q, steps, delta)


@pytest.mark.parametrize("overrides, needle", [
    (["train.privacy=true"], "exactly one of"),
    (["train.privacy=true", "train.privacy_noise_multiplier=1.0", "train.privacy_target_epsilon=8"], "exactly one"),
    (["train.privacy=true", "train.privacy_noise_multiplier=1.0", "train.privacy_microbatches=5"],
     "train.privacy_microbatches"),
    (["train.privacy=true", "train.privacy_noise_multiplier=1.0", "train.strategy=mirrored"], "train.strategy"),
    (["train.privacy=true", "train.privacy_noise_multiplier=1.0", "train.privacy_l2_norm_clip=0"],
     "train.privacy_l2_norm_clip"),
    (["train.privacy=true", "train.privacy_target_epsilon=-1"], "train.privacy_target_epsilon"),
    (["train.privacy=true", "train.privacy_target_epsilon=8", "train.privacy_train=encoder"], "train.privacy_train"),
    (["train.privacy=true", "train.privacy_target_epsilon=8", "model.backbone=none"], "privacy_train=all"),
])
def test_config_rejects_an_incomplete_or_unsupported_private_run(overrides, needle):
    with pytest.raises(PipelineError, match=needle) as e:
        load_config(ROOT / "params.yaml", overrides)
    assert str(e.value).startswith("--set ") and "\n" not in str(e.value)


def test_config_accepts_a_private_run_and_ignores_the_keys_when_off():
    cfg = load_config(ROOT / "params.yaml", ["train.privacy=true", "train.privacy_target_epsilon=8",
                                             "train.privacy_microbatches=8"])
    assert cfg.train.privacy and cfg.train.privacy_target_epsilon == 8.0
    assert not load_config(ROOT / "params.yaml", ["train.privacy_microbatches=5"]).train.privacy


def test_report_and_model_card_name_epsilon_and_what_it_does_not_cover():
    record = {"epsilon": 7.93, "delta": 1e-4, "train_rows": 10000, "steps": 500, "noise_multiplier": 0.8,
              "l2_norm_clip": 1.0, "sampling_rate": 0.0256, "microbatches": 256, "covers": "the weights",
              "not_covered": ["the vocabulary"]}
    fact, = privacy_fact(record)
    assert "ε = 7.93" in fact and "δ = 1.00e-04" in fact and "not covered: the vocabulary" in fact
    assert "ε holds for it" in privacy_markdown(record, ["dynamic_range"])
    card = privacy_markdown(record, ["student", "int8"])
    assert "ε does NOT hold" in card and "- the vocabulary" in card
    assert privacy_markdown(None) == "" and privacy_fact(None) == []


@pytest.mark.e2e
def test_private_train_run_records_its_privacy(toy_data, tmp_path):
    from pipeline.measure.predictors import load_predictor
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(
        tmp_path, "train.epochs=2", "train.privacy=true", "train.privacy_target_epsilon=5", "train.patience=5",
        "train.bucketing=false", "train.privacy_train=all"))  # 25 batches an epoch
    run_data_stage(cfg, str(toy_data), "toy")
    metrics = run_train_stage(cfg, "toy")

    model_dir = tmp_path / "saved_models" / "toy"
    privacy = json.loads((model_dir / "metrics.json").read_text())["privacy"]
    assert privacy == json.loads(json.dumps(metrics["privacy"]))
    assert privacy["steps"] == 2 * 25 and privacy["train_rows"] == 400 and privacy["delta"] == 1 / 400
    assert privacy["epsilon"] <= 5.0 and privacy["epsilon"] == pytest.approx(
        epsilon(privacy["noise_multiplier"], 16 / 400, 50, 1 / 400))
    assert "ngrams" not in metrics  # the n-gram term's fit is not private: left out
    model = load_predictor(model_dir).model  # saved without the DP optimizer, loadable as any model
    assert not any(layer.name == "ngrams" for layer in model.layers)


@pytest.mark.e2e
def test_private_head_run_leaves_the_backbone_as_published(toy_data, tmp_path):
    from test_backbone import make_tiny_bert

    from pipeline.model.backbone import load_backbone_weights
    from pipeline.model.build import load_model
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    bert, _, _ = make_tiny_bert(tmp_path / "bert")
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(
        tmp_path, f"model.backbone={bert}", "train.epochs=3", "train.privacy=true",
        "train.privacy_noise_multiplier=0.5", "train.privacy_head_learning_rate=0.05", "train.patience=5",
        "train.bucketing=false"))  # train.privacy_train: head, the default
    run_data_stage(cfg, str(toy_data), "toy")
    metrics = run_train_stage(cfg, "toy")

    privacy = metrics["privacy"]
    assert privacy["trained"] == "head" and "backbone is the public checkpoint" in privacy["covers"]
    assert privacy["steps"] == 3 * 25
    model = load_model(tmp_path / "saved_models" / "toy" / "model.keras")
    published = tf.keras.models.clone_model(model)
    load_backbone_weights(published, bert)
    for layer, start in zip(model.layers, published.layers):
        if layer.name != "probabilities":  # every other weight is the checkpoint's, bit for bit
            for w, w0 in zip(layer.get_weights(), start.get_weights()):
                np.testing.assert_array_equal(w, w0, err_msg=layer.name)
    # the head learned: a random tiny BERT's features hardly separate the toy classes (a logistic regression on
    # them: 0.59 on dev), so its train loss, not dev accuracy, shows it
    history = json.loads((tmp_path / "saved_models" / "toy" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"] - 0.02
