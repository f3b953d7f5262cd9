"""The causal Transformer: causality, tied embeddings, positions, .keras round trip, bfloat16."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.lm.config import LMConfig
from pipeline.lm.model import build_lm, float32_copy, load_lm
from pipeline.model import EncoderBlock

CFG = LMConfig(context=12, d_model=16, num_heads=2, num_layers=2, ff_dim=32, dropout=0.0)


@pytest.fixture(scope="module")
def lm():
    tf.keras.utils.set_random_seed(0)
    return build_lm(CFG, 11)


def _ids(seed, length=12):
    return np.random.default_rng(seed).integers(0, 11, (2, length)).astype(np.int32)


def test_logits_shape_and_dtype(lm):
    out = lm(_ids(0))
    assert out.shape == (2, 12, 11) and out.dtype == tf.float32
    assert lm(_ids(0, 5)).shape == (2, 5, 11)  # any length up to the context


def test_later_tokens_do_not_change_earlier_logits(lm):
    ids = _ids(1)
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 3) % 11
    a, b = lm(ids).numpy(), lm(changed).numpy()
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3  # and the later ones do change


def test_bidirectional_block_would_leak():
    """The causal test above can fail: the same blocks without the causal mask see later tokens."""
    block = EncoderBlock(16, 2, 32)
    x = tf.random.normal([1, 6, 16], seed=1)
    y = tf.concat([x[:, :3], tf.random.normal([1, 3, 16], seed=2)], 1)
    mask = tf.ones([1, 6])
    assert np.abs((block([x, mask]) - block([y, mask]))[:, :3].numpy()).max() > 1e-3


def test_output_projection_is_the_embedding_matrix(lm):
    names = [w.name for w in lm.weights if "embeddings" in w.name and "position" not in w.name]
    assert len(names) == 1  # one matrix, used twice
    emb = lm.get_layer("embedding")
    final = tf.keras.Model(lm.input, lm.get_layer("final_norm").output)
    expected = final(_ids(2)).numpy() @ emb.embeddings.numpy().T
    np.testing.assert_allclose(lm(_ids(2)).numpy(), expected, atol=1e-4)


def test_causal_block_refuses_convolution():
    with pytest.raises(ValueError, match="causal=True needs conv_width 0"):
        EncoderBlock(16, 2, 32, conv_width=3, causal=True)
    assert EncoderBlock(16, 2, 32, causal=True).get_config()["causal"] is True


def test_keras_round_trip(lm, tmp_path):
    lm.save(tmp_path / "lm.keras")
    back = load_lm(tmp_path / "lm.keras")
    np.testing.assert_allclose(back(_ids(3)).numpy(), lm(_ids(3)).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="nothing.keras: language model not found"):
        load_lm(tmp_path / "nothing.keras")


def test_sinusoidal_positions_and_bfloat16_copy(tmp_path):
    cfg = LMConfig(**{**CFG.__dict__, "position": "sinusoidal"})
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_lm(cfg, 11)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block_0").compute_dtype == "bfloat16" and model(_ids(4)).dtype == tf.float32
    assert not any("position" in w.name for w in model.weights)
    copy = float32_copy(model, cfg, 11)
    assert copy.get_layer("block_0").compute_dtype == "float32"
    np.testing.assert_allclose(copy(_ids(4)).numpy(), model(_ids(4)).numpy(), atol=0.3)  # bfloat16 rounding
