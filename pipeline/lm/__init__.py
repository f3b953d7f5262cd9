"""Causal language modelling: character tokenizer, training windows, a causal Transformer from the project's
layers, bits-per-character measurement, a Kneser-Ney n-gram baseline, KV-cache TFLite export and generation."""
