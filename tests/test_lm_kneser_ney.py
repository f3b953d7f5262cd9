"""The interpolated Kneser-Ney n-gram baseline: a proper distribution, and it learns what it counts."""
import math

import numpy as np
import pytest

import tensorflow as tf

from pipeline.lm.kneser_ney import KneserNey, ngram_rows, table_from_counts
from pipeline.lm.model import HashedNgramLogits

RNG = np.random.default_rng(0)
TRAIN = RNG.integers(0, 6, 3000)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_probabilities_sum_to_one_in_every_context(order):
    kn = KneserNey(order).fit(TRAIN, 7)  # id 6 never occurs: it still gets some mass
    for context in ([1, 2, 3], [5, 5, 5], [6, 6, 6]):
        total = sum(kn.probabilities(np.array(context + [w]))[-1] for w in range(7))
        assert total == pytest.approx(1.0)
        assert kn.probabilities(np.array(context + [6]))[-1] > 0


def test_higher_order_learns_a_deterministic_sequence():
    pattern = np.tile([0, 1, 0, 2, 0, 3], 200)  # after 0 comes 1, 2, 3 in turn: needs 2 tokens of history
    bigram = KneserNey(2).fit(pattern, 4).score(pattern[:300], 300)["bits_per_char"]
    trigram = KneserNey(3).fit(pattern, 4).score(pattern[:300], 300)["bits_per_char"]
    assert bigram > 0.7 and trigram < 0.1


def test_bigram_backs_off_to_continuation_counts():
    """'a' is frequent but only ever follows 'b'; 'c' follows three different tokens: in an unseen context
    Kneser-Ney prefers 'c' (more contexts), not 'a' (more occurrences)."""
    tokens = np.array([1, 0] * 20 + [0, 2, 1, 2, 3, 2, 3])
    kn = KneserNey(2).fit(tokens, 5)
    p = kn.probabilities(np.array([4, 0, 4, 2]))  # context 4 never seen
    assert p[3] > p[1]


def test_random_text_costs_its_entropy():
    test = RNG.integers(0, 6, 2000)
    s = KneserNey(3).fit(TRAIN, 6).score(test, len(test))
    assert math.log2(6) - 0.02 < s["bits_per_char"] < math.log2(6) + 0.15


def test_rejects_codes_that_overflow():
    with pytest.raises(ValueError, match="does not fit an int64"):
        KneserNey(8).fit(TRAIN, 256)


def test_next_distributions_agree_with_probabilities():
    kn = KneserNey(4).fit(TRAIN, 7)
    seq = RNG.integers(0, 7, 40)
    p = kn.probabilities(seq)
    dists = kn.next_distributions(np.stack([seq[i - 3:i] for i in range(3, 40)]))
    np.testing.assert_allclose(dists[np.arange(37), seq[3:]], p[3:], rtol=1e-12)
    np.testing.assert_allclose(dists.sum(1), 1.0)


def test_ngram_rows_give_each_context_length_a_prime_four_times_its_contexts():
    tokens = np.array([0, 1, 2, 0, 1, 3] * 20)  # contexts: 4 of length 1, 5 of length 2, 6 of length 3
    # length 1: 4 x 4 = 16, but only 6 ids (5 tokens and the pad) can precede: 7; then the primes >= 20 and 24
    assert ngram_rows(tokens, 5, order=4, most=1000) == [7, 23, 29]
    assert ngram_rows(tokens, 5, order=4, most=12) == [7, 11, 11]  # at most the largest prime <= most


@pytest.mark.parametrize("sized", [False, True])
def test_table_from_counts_reproduces_kneser_ney(sized):
    """With buckets to spare (no collisions), the table's summed rows are the KN log-probabilities."""
    tokens = RNG.integers(0, 4, 400)
    # sized: 7 and 37 rows, one per possible context of 1 and 2 of the 6 ids
    layer = HashedNgramLogits(5, order=3, buckets=ngram_rows(tokens, 5, 3, 1009) if sized else 1009)
    assert layer.buckets == ([7, 37] if sized else [1009, 1009])
    layer.build((None, None))
    table_from_counts(layer, tokens)
    logits = layer(tf.constant(tokens[None], tf.int32)).numpy()[0]
    probs = np.exp(logits[1:-1])
    kn = KneserNey(3).fit(tokens, 5)
    np.testing.assert_allclose(probs[np.arange(398), tokens[2:]], kn.probabilities(tokens)[2:], rtol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)
