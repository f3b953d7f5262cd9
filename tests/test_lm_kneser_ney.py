"""The interpolated Kneser-Ney n-gram baseline: a proper distribution, and it learns what it counts."""
import math

import numpy as np
import pytest

from pipeline.lm.kneser_ney import KneserNey

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
