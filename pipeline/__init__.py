"""liteformer: train, measure, compress and ship a small Transformer text classifier."""
import os

# TFMOT 0.8.1 works only with Keras 2, so tf.keras must resolve to tf-keras. This has to be set
# before TensorFlow is first imported, which is why it lives at the package root.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# C++ INFO/WARNING/ERROR logs (e.g. failed CUDA probes on CPU machines) drown the output; Python
# errors are unaffected. Set TF_CPP_MIN_LOG_LEVEL=0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"

# The model's int32 [batch, seq_len] inputs, named as MediaPipe's BERT text classifier expects. Here, not
# in pipeline/model/, so that modules which must not import TensorFlow (the benchmark worker,
# pipeline/measure/latency.py) share them.
INPUT_NAMES = ("input_word_ids", "input_mask", "input_type_ids")
