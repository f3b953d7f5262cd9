"""Bits per character and friends: window plan, exact totals on known distributions, Keras scoring."""
import math

import numpy as np
import pytest

from pipeline.lm.measure import score_tokens, window_plan


@pytest.mark.parametrize("n,context,stride", [(2, 4, 2), (10, 4, 2), (11, 4, 4), (50, 8, 3), (9, 8, 1), (100, 16, 16)])
def test_every_target_is_scored_once_with_enough_history(n, context, stride):
    seen = []
    for start, first in window_plan(n, context, stride):
        targets = range(first, min(start + context, n - 1) + 1)
        assert all(t - start <= context for t in targets)
        if start:  # after the first window, at least context - stride tokens of history
            assert all(t - start >= context - stride for t in targets)
        seen.extend(targets)
    assert seen == list(range(1, n))


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="need at least 2"):
        window_plan(1, 4, 2)
    with pytest.raises(ValueError, match="stride must be in 1..4"):
        window_plan(10, 4, 5)


def test_uniform_model_costs_log2_vocab_bits_per_token():
    tokens = np.random.default_rng(0).integers(0, 8, 101)
    s = score_tokens(lambda x: np.zeros(x.shape + (8,)), tokens, 16, 8, n_chars=202)
    assert s["bits_per_char"] == pytest.approx(3 * 101 / 202)  # 3 bits a token, two characters a token
    assert s["perplexity"] == pytest.approx(8) and s["nats_per_token"] == pytest.approx(math.log(8))


def test_a_model_that_knows_the_next_token_scores_near_zero():
    tokens = np.arange(60) % 5  # 0 1 2 3 4 0 1 ...

    def oracle(x):  # the next token is the current one plus 1
        return 30.0 * np.eye(5)[(x + 1) % 5]
    s = score_tokens(oracle, tokens, 8, 5, n_chars=60, stride=3)
    assert s["accuracy"] == 1.0
    assert s["bits_per_char"] == pytest.approx(math.log2(5) / 60, abs=1e-6)  # the first token only


def test_strided_scoring_uses_history_that_non_overlapping_windows_lack():
    tokens = np.arange(64) % 4

    def from_history(x):  # right only when it has seen a previous token in the window
        out = np.zeros(x.shape + (4,))
        out[:, 1:] = 20.0 * np.eye(4)[(x[:, 1:] + 1) % 4]
        return out
    strided = score_tokens(from_history, tokens, 8, 4, 64, stride=4)
    disjoint = score_tokens(from_history, tokens, 8, 4, 64, stride=8)
    assert strided["accuracy"] > disjoint["accuracy"]
    assert strided["bits_per_char"] < disjoint["bits_per_char"]
