"""Language-model scores of a whole text: cross-entropy per token (nats), perplexity, bits per character,
next-token accuracy; for a Keras model, a .tflite file (LiteRT) or any function from windows to logits.

The text is scored with strided windows: each window holds `context` tokens and scores only its last `stride`
predictions (the first window scores all of its own), so every token after the first window is predicted from
at least context - stride tokens of history. Non-overlapping windows would predict a window's first tokens
from almost nothing and overstate the loss; stride 1 (every token with a full window) costs `context` times
more. The first token of the text, which nothing predicts, is charged log(vocab_size) (a uniform guess), so
bits per character is the whole text's bits over its characters and compares across tokenizers.
"""
import math

import numpy as np


def window_plan(n_tokens, context, stride):
    """[(start, first scored target index)]: windows tokens[start:start+context] predicting targets
    start+1 .. start+context, each scoring targets from `first` on, so every target 1..n-1 is scored once."""
    if n_tokens < 2:
        raise ValueError(f"{n_tokens} tokens: need at least 2 to score a prediction")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..{context}, got {stride}")
    plan, scored = [(0, 1)], min(context, n_tokens - 1)  # targets 1..scored are done
    while scored < n_tokens - 1:
        end = min(scored + stride, n_tokens - 1)  # last target of the next window
        start = max(end - context, 0)
        plan.append((start, scored + 1))
        scored = end
    return plan


def score_tokens(logits_fn, tokens, context, vocab_size, n_chars, stride=None, batch=32):
    """Scores of a token stream; logits_fn(inputs int32 [B, context]) -> logits [B, context, V]. Short windows
    are padded with id 0 at the end (the causal model's earlier positions cannot see it)."""
    tokens = np.asarray(tokens, np.int32)
    stride = stride or context // 2
    plan = window_plan(len(tokens), context, stride)
    nll, correct = math.log(vocab_size), 0  # the first token: a uniform guess
    for i in range(0, len(plan), batch):
        chunk = plan[i:i + batch]
        inputs = np.zeros((len(chunk), context), np.int32)
        for row, (start, _) in enumerate(chunk):
            piece = tokens[start:start + context]
            inputs[row, :len(piece)] = piece
        logits = np.asarray(logits_fn(inputs), np.float64)
        for row, (start, first) in enumerate(chunk):
            last = min(start + context, len(tokens) - 1)  # last target this window predicts
            pos = np.arange(first - 1 - start, last - start)  # input positions whose next token is scored
            targets = tokens[start + pos + 1]
            z = logits[row, pos]
            logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            nll += float(np.sum(logz - z[np.arange(len(pos)), targets]))
            correct += int(np.sum(z.argmax(-1) == targets))
    return summarize(nll, len(tokens), n_chars, correct, len(tokens) - 1)


def summarize(nll, n_tokens, n_chars, correct, predicted):
    """The score dict from a total negative log-likelihood in nats over n_tokens tokens of n_chars characters."""
    per_token = nll / n_tokens
    return {"nats_per_token": per_token, "perplexity": math.exp(per_token),
            "bits_per_char": nll / math.log(2) / n_chars, "accuracy": correct / max(predicted, 1),
            "tokens": int(n_tokens), "characters": int(n_chars)}


def score_keras(model, tokenizer, text, context, stride=None, batch=32):
    """Scores of `text` under a Keras LM (input_ids [B, T] -> logits [B, T, V])."""
    def logits_fn(inputs):
        return model(inputs, training=False).numpy()
    return score_tokens(logits_fn, tokenizer.encode(text), context, tokenizer.vocab_size, len(text), stride, batch)


def score_tflite(path, tokenizer, text, stride=None, threads=1):
    """Scores of `text` under an exported .tflite file, through its prefill signature (one window per call)."""
    from pipeline.lm.export import LiteRTLM  # the export module (TFLite converter) only for a .tflite file
    lm = LiteRTLM(path, threads=threads)

    def logits_fn(inputs):
        return np.concatenate([lm.window_logits(row[None]) for row in inputs])
    return score_tokens(logits_fn, tokenizer.encode(text), lm.context, tokenizer.vocab_size, len(text), stride)
