"""Measurements: metrics, predictors behind one interface, latency, FLOPs, the bag-of-words baseline."""
