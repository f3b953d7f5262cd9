"""The count-based baseline: an interpolated Kneser-Ney token n-gram model (absolute discount), numpy only.

N-grams are int64 codes (base vocab_size), counted with np.unique and looked up with np.searchsorted, so a
7-gram model of a million characters builds and scores in seconds. Orders below the highest use continuation
counts (how many distinct tokens precede an n-gram), the base is the continuation unigram mixed with uniform.
"""

import numpy as np

from pipeline.lm.measure import summarize


def _codes(tokens, k, base):
    """Code of the k-gram ending at each position i >= k-1 (array of len(tokens) - k + 1)."""
    code = np.zeros(len(tokens) - k + 1, np.int64)
    for j in range(k):
        code = code * base + tokens[j:len(tokens) - k + 1 + j]
    return code


def _lookup(keys, values, queries):
    """values[keys == q] for each query, 0 where a query is absent (keys sorted)."""
    idx = np.clip(np.searchsorted(keys, queries), 0, max(len(keys) - 1, 0))
    hit = keys[idx] == queries if len(keys) else np.zeros(len(queries), bool)
    return np.where(hit, values[idx] if len(keys) else 0, 0)


class KneserNey:
    """Interpolated Kneser-Ney of `order` over token ids < vocab_size."""

    def __init__(self, order=7, discount=0.75):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order, self.discount = int(order), float(discount)

    def fit(self, tokens, vocab_size):
        """Count every n-gram of `tokens` up to the order."""
        if vocab_size ** self.order >= 2 ** 62:
            raise ValueError(f"vocabulary {vocab_size} ** order {self.order} does not fit an int64 code")
        tokens = np.asarray(tokens, np.int64)
        self.vocab_size, self.tables = vocab_size, {}
        for k in range(1, self.order + 1):
            if k == self.order:  # raw counts
                grams, counts = np.unique(_codes(tokens, k, vocab_size), return_counts=True)
            else:  # continuation counts: distinct tokens seen before the k-gram
                longer = np.unique(_codes(tokens, k + 1, vocab_size))
                grams, counts = np.unique(longer % vocab_size ** k, return_counts=True)
            contexts, inverse = np.unique(grams // vocab_size, return_inverse=True)
            totals = np.bincount(inverse, weights=counts).astype(np.int64)
            types = np.bincount(inverse).astype(np.int64)
            self.tables[k] = (grams, counts, contexts, totals, types)
        return self

    def probabilities(self, tokens):
        """P(token_i | up to order-1 previous tokens) for every position of `tokens`."""
        tokens = np.asarray(tokens, np.int64)
        n, v, d = len(tokens), self.vocab_size, self.discount
        grams, counts, _, totals, types = self.tables[1]
        cont = _lookup(grams, counts, tokens)
        p = (np.maximum(cont - d, 0) + d * types[0] / v) / totals[0]  # continuation unigram + uniform
        for k in range(2, self.order + 1):
            grams, counts, contexts, totals, types = self.tables[k]
            pos = np.arange(k - 1, n)  # positions with k-1 tokens of history
            c = _lookup(grams, counts, _codes(tokens, k, v))
            ctx = _codes(tokens, k - 1, v)[:n - k + 1]
            total, typ = _lookup(contexts, totals, ctx), _lookup(contexts, types, ctx)
            seen = total > 0
            mixed = (np.maximum(c - d, 0) + d * typ * p[pos]) / np.maximum(total, 1)
            p[pos] = np.where(seen, mixed, p[pos])
        return p

    def next_distributions(self, contexts):
        """[N, V] next-token distributions after each row of `contexts` [N, j] (j < order): the recursion of
        probabilities() up to order j+1 (continuation counts below the model's order, raw counts at it)."""
        contexts = np.asarray(contexts, np.int64)
        n, j = contexts.shape
        v, d = self.vocab_size, self.discount
        grams, counts, _, totals, types = self.tables[1]
        cont = _lookup(grams, counts, np.arange(v))
        p = np.tile((np.maximum(cont - d, 0) + d * types[0] / v) / totals[0], (n, 1))
        code = np.zeros(n, np.int64)
        for k in range(2, j + 2):  # context: the last k-1 tokens
            code = code + contexts[:, j - k + 1] * v ** (k - 2)
            grams, counts, contexts_k, totals_k, types_k = self.tables[k]
            total, typ = _lookup(contexts_k, totals_k, code), _lookup(contexts_k, types_k, code)
            c = _lookup(grams, counts, (code[:, None] * v + np.arange(v)).ravel()).reshape(n, v)
            mixed = (np.maximum(c - d, 0) + d * typ[:, None] * p) / np.maximum(total, 1)[:, None]
            p = np.where((total > 0)[:, None], mixed, p)
        return p

    def score(self, tokens, n_chars):
        """The same score dict as pipeline.lm.measure (the first token gets its unigram probability)."""
        p = self.probabilities(tokens)
        nll = float(-np.log(p).sum())
        return summarize(nll, len(tokens), n_chars, 0, len(tokens) - 1) | {"accuracy": None}


def table_from_counts(layer, tokens, discount=0.75):
    """Fill a HashedNgramLogits table from counts: context length j's row holds log P_KN(w | last j tokens)
    - log P_KN(w | last j-1 tokens), so the rows of a context seen in `tokens` sum to its Kneser-Ney
    log-probabilities (order = layer.order) and an unseen one falls back as Kneser-Ney does. Contexts that
    share a bucket share their count-weighted mean row. The model starts where counting ends."""
    v, order = layer.vocab_size, layer.order
    tokens = np.asarray(tokens, np.int64)
    kn = KneserNey(order, discount).fit(tokens, v)
    table = np.zeros((sum(layer.buckets), v))
    weight = np.zeros(len(table))
    for j in range(1, order):
        _, first, count = np.unique(_codes(tokens[:-1], j, v), return_index=True, return_counts=True)
        ctx = np.stack([tokens[first + i] for i in range(j)], axis=1)  # every context followed by a token
        step = np.log(kn.next_distributions(ctx))
        if j > 1:
            step -= np.log(kn.next_distributions(ctx[:, 1:]))
        rows = layer.rows(ctx.astype(np.int32)).numpy()[:, -1, j - 1]
        np.add.at(table, rows, step * count[:, None])
        np.add.at(weight, rows, count)
    layer.table.assign((table / np.maximum(weight, 1)[:, None]).astype(np.float32))


def ngram_rows(tokens, vocab_size, order, most):
    """Bucket counts per context length j = 1..order-1: the smallest prime >= 4 x the distinct contexts of that
    length in `tokens` (a quarter of the buckets taken: few contexts share one), or >= (vocab + 1)^j, one per
    possible context, if that is fewer; at most `most`."""
    tokens, sizes = np.asarray(tokens, np.int64), []
    for j in range(1, order):
        contexts = len(np.unique(_codes(tokens, j, vocab_size)))
        sizes.append(min(_prime_at_least(min(4 * contexts, (vocab_size + 1) ** j)), _prime_at_most(most)))
    return sizes


def _prime_at_least(n):
    n = max(int(n), 2)
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


def _prime_at_most(n):
    n = max(int(n), 2)
    while n > 2 and any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n -= 1
    return n
