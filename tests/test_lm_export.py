"""KV-cache export of a model with the hashed n-gram term: prefill and decode equal the Keras model, in TF
and through LiteRT (float32, dynamic range, int8), and LiteRT scoring equals Keras scoring. (The plain model's
export: test_lm_generate.)"""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.lm.config import LMConfig
from pipeline.lm.export import CachedLM, LiteRTLM, check_parity, export_tflite
from pipeline.lm.measure import score_keras, score_tflite
from pipeline.lm.model import build_lm
from pipeline.lm.tokenizer import CharTokenizer

CFG = LMConfig(context=16, d_model=32, num_heads=2, num_layers=2, ff_dim=64, dropout=0.0, ngram_order=3,
               ngram_buckets=31)
TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    tok = CharTokenizer.fit(TEXT)
    model = build_lm(CFG, tok.vocab_size)
    table = model.get_layer("ngram_logits").table  # trained tables are not zero: make it count
    table.assign(tf.random.normal(table.shape, seed=1))
    root = tmp_path_factory.mktemp("export")
    paths = {}
    for mode in ("float32", "dynamic_range", "int8"):
        paths[mode] = root / f"{mode}.tflite"
        paths[mode].write_bytes(export_tflite(model, mode, tok.encode(TEXT), samples=8))
    return model, tok, paths


def test_cached_prefill_and_decode_equal_keras(setup):
    model, tok, _ = setup
    ids = np.array([tok.encode(TEXT[:16])], np.int32)
    ref = model(ids).numpy()[0]
    cached = CachedLM(model)
    np.testing.assert_allclose(cached.run_prefill(ids)["logits"][0], ref, atol=1e-5)
    k, v = cached.empty_cache(), cached.empty_cache()
    for pos in range(16):  # token by token from an empty cache
        out = cached.run_decode(ids[0, :pos + 1], pos, k, v)
        k, v = out["k_cache"], out["v_cache"]
        np.testing.assert_allclose(out["logits"][0], ref[pos], atol=1e-5)


def test_decode_ignores_cache_slots_after_its_position(setup):
    model, tok, _ = setup
    cached = CachedLM(model)
    ids = np.array([tok.encode(TEXT[:16])], np.int32)
    full = cached.run_prefill(ids)
    junk = {k: full[k] + np.random.default_rng(0).normal(size=full[k].shape).astype(np.float32) * 5
            for k in ("k_cache", "v_cache")}
    for name in ("k_cache", "v_cache"):  # keep slots 0..5 only
        junk[name][:, :, :, :6] = full[name][:, :, :, :6]
    out = cached.run_decode(ids[0, :7], 6, junk["k_cache"], junk["v_cache"])
    np.testing.assert_allclose(out["logits"][0], full["logits"][0, 6], atol=1e-5)


def test_tflite_files_match_keras(setup):
    model, tok, paths = setup
    tokens = tok.encode(TEXT)
    assert check_parity(model, paths["float32"], tokens, 1e-4) < 1e-4
    assert check_parity(model, paths["dynamic_range"], tokens, 0.5) > 0  # int8 weights: close, not equal
    assert check_parity(model, paths["int8"], tokens, 2.0) > 0  # int8 activations: 0.6 to 1.1 seen run to run
    with pytest.raises(ValueError, match="int8.tflite: TFLite logits differ from Keras by"):
        check_parity(model, paths["int8"], tokens, 1e-6)
    assert paths["dynamic_range"].stat().st_size < paths["float32"].stat().st_size


def test_litert_signatures_and_scores(setup):
    model, tok, paths = setup
    lm = LiteRTLM(paths["float32"])
    assert lm.context == 16 and lm.vocab_size == tok.vocab_size and lm.cache_shape == (2, 1, 2, 16, 16)
    keras = score_keras(model, tok, TEXT, 16)
    lite = score_tflite(paths["float32"], tok, TEXT)
    assert lite["bits_per_char"] == pytest.approx(keras["bits_per_char"], abs=1e-5)
    assert lite["accuracy"] == keras["accuracy"]
    int8 = score_tflite(paths["int8"], tok, TEXT)
    assert int8["bits_per_char"] == pytest.approx(keras["bits_per_char"], abs=0.2)


def test_export_rejects_unknown_mode_and_uncalibrated_int8(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="unknown export mode 'float8'"):
        export_tflite(model, "float8")
    with pytest.raises(ValueError, match="int8 export needs calibration tokens"):
        export_tflite(model, "int8")
