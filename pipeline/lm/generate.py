"""Text generation from a cached LM (CachedLM over a Keras model, or LiteRTLM over a .tflite file): the prompt
is prefilled once, then each token is one decode step. Greedy (temperature 0), temperature, top-k, top-p,
seed, stop string, max tokens. When the window is full, the last half of it is prefilled again (learned
positions cannot slide), so that cost comes once every context/2 tokens."""
import time

import numpy as np


def check_sampling(temperature, top_k, top_p, max_tokens):
    """ValueError (one line) for settings outside their ranges."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")


def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """One token id from next-token logits [V]: argmax at temperature 0, else drawn from the softmax of
    logits / temperature restricted to the top_k most likely and then to the smallest set of mass >= top_p."""
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < len(z):
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
        keep = np.zeros_like(p, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def _prefill(lm, window):
    """Logits after the last token of `window` (len <= context) and the cache it leaves."""
    ids = np.zeros((1, lm.context), np.int32)
    ids[0, :len(window)] = window
    out = lm.run_prefill(ids)
    return out["logits"][0, len(window) - 1], out["k_cache"], out["v_cache"]


def generate(lm, tokenizer, prompt, max_tokens=200, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None):
    """{"text": the continuation (cut before `stop`), "tokens", "prefill_seconds", "decode_tokens_per_second"}.
    Prompt characters outside the vocabulary become the unknown id, as the tokenizer encodes them."""
    check_sampling(temperature, top_k, top_p, max_tokens)
    window = tokenizer.encode(prompt)[-lm.context:]
    if not window:
        raise ValueError("empty prompt: give at least one character")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    logits, k, v = _prefill(lm, window)
    prefill_seconds = time.perf_counter() - started
    out, text = [], ""
    started = time.perf_counter()
    while len(out) < max_tokens:
        token = sample(logits, rng, temperature, top_k, top_p)
        out.append(token)
        text = tokenizer.decode(out)
        if stop and stop in text:
            text = text[:text.index(stop)]
            break
        if len(out) == max_tokens:
            break
        if len(window) == lm.context:  # full: start again from its last half (plus the new token)
            window = window[lm.context // 2 + 1:] + [token]
            logits, k, v = _prefill(lm, window)
            continue
        window.append(token)
        step = lm.run_decode(window, len(window) - 1, k, v)
        logits, k, v = step["logits"][0], step["k_cache"], step["v_cache"]
    seconds = time.perf_counter() - started
    return {"text": text, "tokens": len(out), "prefill_seconds": prefill_seconds,
            "decode_tokens_per_second": len(out) / seconds if seconds > 0 else float("inf")}
