"""The causal Transformer: causality, tied embeddings, positions, .keras round trip, bfloat16."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.lm.config import LMConfig
from pipeline.lm.model import HashedNgramLogits, build_lm, float32_copy, load_lm
from pipeline.model.encoder import EncoderBlock

CFG = LMConfig(context=12, d_model=16, num_heads=2, num_layers=2, ff_dim=32, dropout=0.0, ngram_order=0)


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


def test_hashed_ngram_rows_follow_the_preceding_tokens():
    layer = HashedNgramLogits(5, order=3, buckets=37)
    rows = layer.rows(tf.constant([[1, 2, 1, 2, 3, 2]])).numpy()[0]  # [T, 2]: 1 and 2 tokens of context
    assert rows.shape == (6, 2) and rows[:, 0].max() < 37 <= rows[:, 1].min()
    assert rows[1, 0] == rows[3, 0] == rows[5, 0]  # current token 2
    assert rows[3, 1] == rows[1, 1] and rows[5, 1] != rows[3, 1]  # "1 2" twice, then "3 2"
    assert rows[0, 1] != rows[2, 1]  # "<start> 1" is not "2 1"
    with pytest.raises(ValueError, match="n-gram order must be >= 2"):
        HashedNgramLogits(5, order=1, buckets=37)


def test_model_with_ngram_term_stays_causal_and_round_trips(tmp_path):
    cfg = LMConfig(**{**CFG.__dict__, "ngram_order": 4, "ngram_buckets": 101})
    model = build_lm(cfg, 11)
    table = model.get_layer("ngram_logits").table
    table.assign(tf.random.normal(table.shape, seed=3))
    ids = _ids(5)
    changed = ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % 11
    a, b = model(ids).numpy(), model(changed).numpy()
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    model.save(tmp_path / "ngram.keras")
    np.testing.assert_allclose(load_lm(tmp_path / "ngram.keras")(ids).numpy(), a, atol=1e-6)
