"""The model's bag-of-n-grams term: TF-IDF features of hashed wordpiece n-grams and their logistic regression.

The features are computed from `input_word_ids` alone, so the `.tflite` graph computes them itself
(layers.NgramLogits, builtin TFLite ops only) and the app's inputs do not change. This module holds the
NumPy twin of that computation, used to fit the weights in closed form (scikit-learn's logistic
regression, as the bag-of-words baseline does) instead of by SGD, which on small data sets converges
to a worse bag-of-words model than an exact fit.

Feature rows: unigram id i (its own row, [0, vocab_size)); bigram (a, b) in
vocab_size + (a * P + b) mod buckets; trigram (a, b, c) in vocab_size + buckets + ((bigram hash) * P + c)
mod buckets. An n-gram counts only where all its tokens are real (mask 1); [CLS] and [SEP] take part
(they mark the start and end). A text's feature value is idf(row) * (1 + ln count), L2-normalised per order, as
scikit-learn's TfidfVectorizer(sublinear_tf=True) gives; rows unseen in training get idf 0, so they
change neither the logits nor the norm (TfidfVectorizer drops unknown terms). Each order is normalised
on its own, like the baseline's FeatureUnion of word and character blocks.
"""
import numpy as np
import scipy.sparse as sp

PRIME = 7919  # hash multiplier: vocab_size * PRIME and buckets * PRIME must stay below 2**31 (int32 in TFLite)
INT32_MAX = 2**31 - 1


def term_used(model_cfg, train_rows) -> bool:
    """Whether a model gets the n-gram term: model.ngram_order > 0 and at most model.ngram_max_rows train rows."""
    return bool(model_cfg.ngram_order) and (not model_cfg.ngram_max_rows or train_rows <= model_cfg.ngram_max_rows)


def num_rows(vocab_size, order, buckets):
    """Rows of the feature table: one per unigram, `buckets` per higher order."""
    return vocab_size + max(0, order - 1) * buckets


def check_sizes(vocab_size, order, buckets):
    """Raise ValueError when the int32 hash could overflow or the order is unsupported."""
    if order not in (0, 1, 2, 3):
        raise ValueError(f"n-gram order must be 0 (none), 1, 2 or 3, got {order}")
    if order > 1 and buckets < 1:
        raise ValueError(f"n-gram buckets must be positive, got {buckets}")
    if max(vocab_size, buckets) * PRIME + max(vocab_size, buckets) > INT32_MAX:
        raise ValueError(f"vocab_size {vocab_size} or buckets {buckets} too large for an int32 hash "
                         f"(at most {INT32_MAX // (PRIME + 1)})")


def hashed_ngrams(ids, mask, vocab_size, order, buckets):
    """ids, mask: int arrays [B, T] -> list per order n of (rows [B, T-n+1] int64, valid [B, T-n+1] bool).

    The same arithmetic as NgramLogits (int32 there, no overflow by check_sizes)."""
    ids = np.asarray(ids, np.int64)
    mask = np.asarray(mask) != 0
    length = ids.shape[1]
    out = []
    h = ids
    for n in range(1, order + 1):
        if n > length:
            break
        if n == 1:
            rows = ids
        else:
            h = (h[:, :-1] * PRIME + ids[:, n - 1:]) % buckets
            rows = h + vocab_size + (n - 2) * buckets
        valid = np.all([mask[:, i:length - n + 1 + i] for i in range(n)], axis=0)
        out.append((rows, valid))
    return out


def tf_counts(ids, mask, vocab_size, order, buckets):
    """scipy CSR [B, rows] of raw n-gram counts of each text."""
    ids = np.asarray(ids)
    data_rows, data_cols = [], []
    for rows, valid in hashed_ngrams(ids, mask, vocab_size, order, buckets):
        b, t = np.nonzero(valid)
        data_rows.append(b)
        data_cols.append(rows[b, t])
    r, c = np.concatenate(data_rows), np.concatenate(data_cols)
    counts = sp.csr_matrix((np.ones(len(r), np.float64), (r, c)),
                           shape=(ids.shape[0], num_rows(vocab_size, order, buckets)))
    counts.sum_duplicates()
    return counts


def fit_idf(counts):
    """Smoothed idf of scikit-learn, ln((1 + n) / (1 + df)) + 1, and 0 for rows no text has."""
    n = counts.shape[0]
    df = np.bincount(counts.indices, minlength=counts.shape[1])
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    return np.where(df > 0, idf, 0.0)


def blocks(vocab_size, order, buckets):
    """(start, end) column range of each order's features."""
    starts = [0] + [vocab_size + i * buckets for i in range(order)]
    return list(zip(starts[:order], starts[1:order + 1]))


def tfidf(counts, idf, vocab_size, order, buckets):
    """Sublinear tf (1 + ln count) times idf, L2-normalised within each order's block of columns (as
    scikit-learn's FeatureUnion of one TfidfVectorizer per order gives: bigrams and trigrams are many
    more than unigrams and would otherwise drown them). An empty block stays zero."""
    x = counts.copy().astype(np.float64)
    x.data = 1.0 + np.log(x.data)
    x = (x @ sp.diags(idf)).tocsc()
    parts = []
    for start, end in blocks(vocab_size, order, buckets):
        part = x[:, start:end]
        norms = np.sqrt(np.asarray(part.multiply(part).sum(axis=1)).ravel())
        parts.append(sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ part)
    return sp.hstack(parts).tocsr()


def fit_ngram_logits(ids, mask, labels, num_classes, *, vocab_size, order, buckets, c, class_weight=None,
                     seed=0):
    """Fit multinomial logistic regression on the TF-IDF n-gram features of the training texts.

    Returns (table [rows, num_classes] float32: coefficient * idf, idf [rows] float32, bias [num_classes]).
    """
    # imported here: scikit-learn takes ~1 s to import, and the data stage reads this module for term_used
    from sklearn.linear_model import LogisticRegression

    counts = tf_counts(ids, mask, vocab_size, order, buckets)
    idf = fit_idf(counts)
    x = tfidf(counts, idf, vocab_size, order, buckets)
    lr = LogisticRegression(C=c, max_iter=2000, class_weight=class_weight, random_state=seed)
    lr.fit(x, np.asarray(labels))
    coef, bias = lr.coef_, lr.intercept_
    if num_classes == 2 and coef.shape[0] == 1:  # binary: one score for class 1; class 0 gets its negative half
        coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    table = (coef.T * idf[:, None]).astype(np.float32)
    return table, idf.astype(np.float32), bias.astype(np.float32)


def ngram_logits(ids, mask, table, idf, bias, *, vocab_size, order, buckets):
    """NumPy reference of NgramLogits: [B, num_classes] logits."""
    x = tfidf(tf_counts(ids, mask, vocab_size, order, buckets), idf, vocab_size, order, buckets)
    idf_safe = np.where(idf > 0, idf, 1.0)
    return np.asarray(x @ (table / idf_safe[:, None])) + bias


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_mix(transformer_logits, ngram_logits_, labels):
    """Weights (beta, alpha) >= 0 of softmax(beta * transformer + alpha * ngrams) with the least log loss on
    held-out rows: the two terms are fitted separately, so their scales are not comparable as they come."""
    from scipy.optimize import minimize  # here, as fit_ngram_logits imports scikit-learn

    y = np.asarray(labels)
    zt, zn = np.asarray(transformer_logits, np.float64), np.asarray(ngram_logits_, np.float64)

    def loss(w):
        p = softmax(w[0] * zt + w[1] * zn)
        return -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))

    best = min(([b, a] for b in (0.0, 0.5, 1.0, 2.0) for a in (0.0, 0.5, 1.0, 2.0)), key=loss)
    res = minimize(loss, best, method="L-BFGS-B", bounds=[(0.0, 10.0), (0.0, 10.0)])
    beta, alpha = (res.x if res.fun <= loss(best) else best)
    return float(beta), float(alpha)
