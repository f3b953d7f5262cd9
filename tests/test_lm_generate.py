"""Generation: sampling rules, seed, stop string, max tokens, a window that fills up, Keras and LiteRT agree."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.lm.config import LMConfig
from pipeline.lm.export import CachedLM, LiteRTLM, export_tflite
from pipeline.lm.generate import generate, sample
from pipeline.lm.model import build_lm
from pipeline.lm.tokenizer import CharTokenizer

TEXT = "To be, or not to be, that is the question:\n"
CFG = LMConfig(context=8, d_model=16, num_heads=2, num_layers=1, ff_dim=32, dropout=0.0, ngram_order=0)


@pytest.fixture(scope="module")
def lm():
    tf.keras.utils.set_random_seed(3)
    tok = CharTokenizer.fit(TEXT)
    model = build_lm(CFG, tok.vocab_size)
    return model, tok


def test_sample_rules():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    rng = np.random.default_rng(0)
    assert sample(logits, rng, temperature=0) == 1
    assert {sample(logits, rng, top_k=1) for _ in range(20)} == {1}
    assert {sample(logits, rng, top_p=0.01) for _ in range(20)} == {1}
    assert {sample(logits, rng, top_k=2) for _ in range(200)} == {1, 2}
    # p = 0.089, 0.657, 0.242, 0.012: top_p 0.85 needs the two likeliest (0.899), top_p 0.9 a third
    assert {sample(logits, rng, top_p=0.85) for _ in range(300)} == {1, 2}
    assert {sample(logits, rng, top_p=0.9) for _ in range(300)} == {0, 1, 2}
    draws = [sample(logits, rng, temperature=1.0) for _ in range(4000)]
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, p, atol=0.03)


def _greedy_by_recompute(model, tok, prompt, n, context):
    """Reference: re-run the whole (sliding) window for every token."""
    ids = tok.encode(prompt)
    for _ in range(n):
        window = np.array([ids[-context:]], np.int32)
        ids.append(int(model(window).numpy()[0, -1].argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


def test_greedy_cached_generation_equals_recompute_within_the_window(lm):
    model, tok = lm
    out = generate(CachedLM(model), tok, "To b", max_tokens=4, temperature=0)
    assert out["tokens"] == 4 and out["text"] == _greedy_by_recompute(model, tok, "To b", 4, 8)
    assert out["prefill_seconds"] > 0 and out["decode_tokens_per_second"] > 0


def test_generation_runs_past_the_context(lm):
    model, tok = lm
    out = generate(CachedLM(model), tok, "To be, or", max_tokens=30, temperature=0.8, seed=1)
    assert out["tokens"] == 30 and len(out["text"]) == 30


def test_seed_and_stop_and_max_tokens(lm):
    model, tok = lm
    cached = CachedLM(model)
    a = generate(cached, tok, "to", max_tokens=12, seed=5)["text"]
    assert a == generate(cached, tok, "to", max_tokens=12, seed=5)["text"]
    assert generate(cached, tok, "to", max_tokens=0)["text"] == ""
    stop = a[3]
    cut = generate(cached, tok, "to", max_tokens=12, seed=5, stop=stop)
    assert cut["text"] == a[:a.index(stop)] and stop not in cut["text"]


def test_prompt_errors_and_unknown_characters(lm):
    model, tok = lm
    cached = CachedLM(model)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(cached, tok, "", max_tokens=3)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(cached, tok, "to", top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(cached, tok, "to", temperature=-1)
    assert generate(cached, tok, "Zoë?", max_tokens=3, seed=0)["tokens"] == 3  # unknown characters: id 0


def test_litert_generation_equals_keras(lm, tmp_path):
    model, tok = lm
    path = tmp_path / "lm.tflite"
    path.write_bytes(export_tflite(model, "float32"))
    lite, keras = LiteRTLM(path), CachedLM(model)
    for kwargs in ({"temperature": 0}, {"seed": 2, "top_k": 5}):
        assert (generate(lite, tok, "or not", max_tokens=20, **kwargs)["text"]
                == generate(keras, tok, "or not", max_tokens=20, **kwargs)["text"])
