"""Tests of pipeline/model/ (layers, encoder, build, quantize) on tiny models (d=16, 1-2 layers, vocab 50, sequences of up to 12)."""
import numpy as np
import pytest

import pipeline  # noqa: F401  (before TensorFlow: tf.keras must be tf-keras)
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

from pipeline import INPUT_NAMES
from pipeline.model import build, encoder, layers, quantize
from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError

VOCAB, SEQ, CLASSES = 50, 12, 2
CLS_ID, PAD_ID = 2, 0


def tiny_cfg(**kw):
    base = dict(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=0.0, ngram_order=3, ngram_buckets=64)
    base.update(kw)
    return ModelConfig(**base)


def batch(ids, mask):
    ids = np.asarray(ids, np.int32)
    return {"input_word_ids": ids, "input_mask": np.asarray(mask, np.int32),
            "input_type_ids": np.zeros_like(ids)}


def random_batch(n=4, length=SEQ, real=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, length)).astype(np.int32)
    ids[:, 0] = CLS_ID
    mask = np.zeros((n, length), np.int32)
    mask[:, :real] = 1
    ids[mask == 0] = PAD_ID
    return batch(ids, mask)


def toy_data(n=256, seed=0):
    """[CLS] + random tokens (no 7 or 8) + one 7 (class 0) or one 8 (class 1); lengths 4..12, padded."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, SEQ), PAD_ID, np.int32)
    mask = np.zeros((n, SEQ), np.int32)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        length = rng.integers(4, SEQ + 1)
        body = rng.choice([t for t in range(3, VOCAB) if t not in (7, 8)], length - 1)
        body[rng.integers(0, length - 1)] = 7 if labels[i] == 0 else 8
        ids[i, 0], ids[i, 1:length], mask[i, :length] = CLS_ID, body, 1
    return batch(ids, mask), labels.astype(np.int32)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained on the 7-vs-8 task, with its data and train accuracy."""
    tf.keras.utils.set_random_seed(1)
    x, y = toy_data()
    model = build.build_model(tiny_cfg(), VOCAB, CLASSES, SEQ)
    model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=12, verbose=0)
    acc = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    return model, x, y, acc


def test_sinusoidal_encoding_values():
    pe = layers.sinusoidal_encoding(6, 16)
    assert pe.shape == (6, 16) and pe.dtype == np.float32
    np.testing.assert_array_equal(pe[0], np.tile([0.0, 1.0], 8))
    np.testing.assert_allclose(pe[1, :4], [0.84147098, 0.54030231, 0.31098359, 0.95041528], atol=1e-6)
    np.testing.assert_allclose(pe[3, 4], 0.29552021, atol=1e-6)  # sin(3 / 10000^(4/16))
    assert np.all(np.abs(pe) <= 1.0)


def test_layer_and_model_shapes():
    model = build.build_model(tiny_cfg(), VOCAB, 3, SEQ)
    assert sorted(model.input_names) == sorted(INPUT_NAMES)
    assert all(t.dtype == tf.int32 and t.shape.as_list() == [None, None] for t in model.inputs)
    x = random_batch(n=2)
    probs = model(x, training=False).numpy()
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    emb = layers.TokenAndPositionEmbedding(VOCAB, 16, SEQ)
    h = emb(x["input_word_ids"])
    assert h.shape == (2, SEQ, 16)
    mask = layers.PaddingMask()(x["input_mask"])
    assert mask.shape == (2, SEQ) and mask.dtype == tf.float32
    block = encoder.EncoderBlock(16, 2, 32)
    assert block([h, mask]).shape == (2, SEQ, 16)
    assert layers.LayerNorm()(h).shape == (2, SEQ, 16)
    assert layers.SequencePooling("mean")([h, mask]).shape == (2, 16)
    assert layers.SequencePooling("cls")([h, mask]).shape == (2, 16)
    assert block.compute_output_shape([h.shape, mask.shape]) == (2, SEQ, 16)
    # variable length: shorter batches run through the same model
    assert model(random_batch(n=2, length=5, real=5)).shape == (2, 3)

    with pytest.raises(PipelineError):
        build.build_model(tiny_cfg(num_heads=3), VOCAB, 3, SEQ)
    with pytest.raises(PipelineError, match="conv_width"):  # a window must be centred on its token
        build.build_model(tiny_cfg(conv_width=2), VOCAB, 3, SEQ)


@pytest.mark.parametrize("pooling,position,conv_width", [("mean", "sinusoidal", 3), ("cls", "learned", 0),
                                                        ("mean", "learned", 5)])
def test_padding_does_not_change_outputs(pooling, position, conv_width):
    tf.keras.utils.set_random_seed(0)
    cfg = tiny_cfg(num_layers=2, pooling=pooling, position=position, conv_width=conv_width)
    model = build.build_model(cfg, VOCAB, CLASSES, SEQ)
    short = random_batch(n=4, length=7, real=7)
    long = random_batch(n=4, length=SEQ, real=7)
    long["input_word_ids"][:, :7] = short["input_word_ids"]
    # garbage ids under mask 0 must not matter either
    long["input_word_ids"][:, 7:] = np.arange(4 * (SEQ - 7)).reshape(4, -1) % VOCAB
    a = model(short, training=False).numpy()
    b = model(long, training=False).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # and the test is not vacuous: a real token does change the output
    changed = {k: v.copy() for k, v in short.items()}
    changed["input_word_ids"][:, 3] = (changed["input_word_ids"][:, 3] + 1) % VOCAB
    assert np.abs(model(changed, training=False).numpy() - a).max() > 1e-4


def test_learns_separable_toy_task(trained):
    _, _, _, acc = trained
    assert acc > 0.95, f"train accuracy {acc:.3f}"


def test_save_and_reload_keras_and_savedmodel(trained, tmp_path):
    model, x, _, _ = trained
    ref = model.predict(x, verbose=0)
    keras_path = tmp_path / "model.keras"
    model.save(keras_path)
    sm_path = tmp_path / "savedmodel"
    model.save(sm_path, save_format="tf")
    for path in (keras_path, sm_path):
        loaded = build.load_model(path)
        assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers], path
        np.testing.assert_allclose(loaded.predict(x, verbose=0), ref, atol=1e-6, rtol=0)
    with pytest.raises(PipelineError):
        build.load_model(tmp_path / "missing.keras")


def _prunable_kernels(model):
    out = {}
    for layer in model.layers:
        if isinstance(layer, layers.BaseLayer):
            for w in layer.get_prunable_weights():
                out[w.name] = w.numpy()
    return out


def test_prunable_weights_are_kernels_only():
    def short_names(model):
        return sorted(name.split("/")[-1].split(":")[0] for name in _prunable_kernels(model))

    model = build.build_model(tiny_cfg(), VOCAB, CLASSES, SEQ)
    blocks = ["q_kernel", "k_kernel", "v_kernel", "o_kernel", "ff1_kernel", "ff2_kernel"]
    assert short_names(model) == sorted(["embeddings", "conv_kernel", *blocks])
    plain = build.build_model(tiny_cfg(conv_width=0), VOCAB, CLASSES, SEQ)  # no convolution: no conv weights
    assert short_names(plain) == sorted(["embeddings", *blocks])
    assert not any("conv" in w.name or "ln0" in w.name for w in plain.weights)


def test_prune_whole_model_reaches_target_sparsity():
    tf.keras.utils.set_random_seed(2)
    x, y = toy_data(n=32, seed=3)
    model = build.build_model(tiny_cfg(dropout=0.1), VOCAB, CLASSES, SEQ)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.8, 0))
    assert all(isinstance(l, PruneLowMagnitude)
               for l in pruned.layers if not isinstance(l, tf.keras.layers.InputLayer))
    pruned.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    # ConstantSparsity prunes every `frequency` (default 100) steps from step 0: run past step 100.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    pruned.fit(ds, steps_per_epoch=101, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    assert [type(l) for l in stripped.layers] == [type(l) for l in model.layers]
    kernels = _prunable_kernels(stripped)
    assert len(kernels) == 1 + 7  # the embedding; conv, q, k, v, o, ff1, ff2
    for name, w in kernels.items():
        assert abs(np.mean(w == 0) - 0.8) < 0.02, (name, np.mean(w == 0))
    for layer in stripped.layers:  # biases and LayerNorm parameters are not pruned
        if isinstance(layer, encoder.EncoderBlock):
            assert np.mean(layer.ln1_gamma.numpy() == 0) == 0 and np.mean(layer.q_bias.numpy() == 0) < 0.5
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)


@pytest.fixture(scope="module")
def qat(trained):
    model, x, y, _ = trained
    annotated = quantize.annotate_for_qat(model)
    with quantize.qat_scope():
        qmodel = tfmot.quantization.keras.quantize_apply(annotated)
    qmodel.compile(tf.keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    history = qmodel.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return model, qmodel, x, y, history.history["loss"]


def test_qat_trains_and_stays_close_to_float(qat):
    model, qmodel, x, y, losses = qat
    wrapped = {type(l.layer) for l in qmodel.layers if isinstance(l, tfmot.quantization.keras.QuantizeWrapperV2)}
    assert wrapped == {layers.TokenAndPositionEmbedding, encoder.EncoderBlock, layers.LayerNorm, layers.SequencePooling,
                       layers.ClassifierHead}
    names = {w.name.split("/")[-1].split(":")[0] for w in qmodel.weights}
    assert {"q_kernel_min", "ff2_kernel_max", "embeddings_min", "scores_post_activation_min",
            "ffn_hidden_pre_activation_max", "output_max", "logits_post_activation_min"} <= names
    assert all(np.isfinite(losses))
    # run eagerly once: the block now computes with fake-quantized kernels (<= 255 levels, not the floats)
    qmodel({k: v[:2] for k, v in x.items()}, training=False)
    block = next(l.layer for l in qmodel.layers if isinstance(getattr(l, "layer", None), encoder.EncoderBlock))
    for name in ("q_kernel", "ff1_kernel"):
        used = block._weight_overrides[name].numpy()
        assert np.unique(used).size <= 255 and not np.array_equal(used, getattr(block, name).numpy()), name
    ref = model.predict(x, verbose=0)
    got = qmodel.predict(x, verbose=0)
    diff = np.abs(got - ref).max()
    print(f"QAT vs float: max |dp| {diff:.4f}, losses {losses}")
    assert 0 < diff < 0.1, diff  # fake quantization is active, and small
    margin, qmargin = (np.log(p[:, 1] / p[:, 0]) for p in (ref, got))  # logit differences
    print(f"margins: max |d| {np.abs(qmargin - margin).max():.4f}, max {np.abs(margin).max():.4f}")
    assert np.abs(qmargin - margin).max() < 0.1 * np.abs(margin).max()
    assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) > 0.97
    assert np.mean(np.argmax(got, -1) == y) > 0.95


def test_qat_model_saves_and_reloads(qat, tmp_path):
    _, qmodel, x, _, _ = qat
    qmodel.save(tmp_path / "qat.keras")
    loaded = build.load_model(tmp_path / "qat.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0), atol=1e-6, rtol=0)


def _tflite_predict(content, x):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=content).get_signature_runner()
    rows = []
    for i in range(len(x["input_word_ids"])):
        out = runner(**{k: v[i:i + 1] for k, v in x.items()})
        assert len(out) == 1
        rows.append(next(iter(out.values())))
    return np.concatenate(rows)


def test_tflite_float32_matches_keras(trained):
    model, x, _, _ = trained
    x = {k: v[:16] for k, v in x.items()}
    converter = tf.lite.TFLiteConverter.from_concrete_functions([build.serving_function(model, SEQ)], model)
    content = converter.convert()
    np.testing.assert_allclose(_tflite_predict(content, x), model.predict(x, verbose=0), atol=1e-4, rtol=0)


def test_tflite_qat_converts_with_default_optimizations(qat):
    _, qmodel, x, _, _ = qat
    x = {k: v[:16] for k, v in x.items()}
    converter = tf.lite.TFLiteConverter.from_concrete_functions([build.serving_function(qmodel, SEQ)], qmodel)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    content = converter.convert()
    from ai_edge_litert.interpreter import Interpreter

    dtypes = {d["dtype"] for d in Interpreter(model_content=content).get_tensor_details()}
    assert np.int8 in dtypes
    np.testing.assert_allclose(_tflite_predict(content, x), qmodel.predict(x, verbose=0), atol=0.05)


def test_mixed_bfloat16_forward():
    float_model = build.build_model(tiny_cfg(), VOCAB, CLASSES, SEQ)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build.build_model(tiny_cfg(), VOCAB, CLASSES, SEQ)
        block = model.get_layer("encoder_0")
        assert block.compute_dtype == "bfloat16" and block.variable_dtype == "float32"
        model.set_weights(float_model.get_weights())
        x = random_batch(n=4)
        probs = model(x, training=False)
        assert probs.dtype == tf.float32
        probs = probs.numpy()
        assert np.all(np.isfinite(probs))
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs, float_model(x, training=False).numpy(), atol=0.05)
        # a training step runs too (gradients through the bf16 graph, float32 variables)
        model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        loss = model.train_on_batch(x, np.array([0, 1, 0, 1]))
        assert np.isfinite(loss)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_registered_keras_names_stay_as_saved_models_know_them():
    """Saved .keras files and SavedModels find our classes by registered name: moving a class between modules
    must not change it, or old runs stop loading."""
    from pipeline.model import lowrank, mlm, training  # noqa: F401  (each registers its classes)

    names = {k for k in tf.keras.utils.get_custom_objects() if k.startswith("liteformer>")}
    assert names == {f"liteformer>{n}" for n in (
        "ClassifierHead", "ClipTokenIds", "EncoderBlock", "LayerNorm", "LiteformerQuantizeConfig", "LowRankEncoderBlock",
        "MaskedAccuracy", "MaskedLMHead", "MaskedPerplexity", "NgramLogits", "PaddingMask", "PointQuantizer",
        "SequencePooling", "TokenAndPositionEmbedding", "WarmupLinearDecay", "masked_lm_loss")}
