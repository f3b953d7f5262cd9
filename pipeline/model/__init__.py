"""The Keras model: its layers, building and loading it, quantization, the backbone, the n-gram term, training."""
