"""The parity check every compress run makes: float32.tflite must predict what the Keras model predicts."""
import numpy as np

from pipeline.core.errors import PipelineError


def check_parity(keras_probs, tflite_probs, tolerance, path):
    """Raise if the float32 export and the Keras model disagree on any prediction or any
    probability differs by more than `tolerance`; return the largest difference."""
    keras_probs, tflite_probs = np.asarray(keras_probs), np.asarray(tflite_probs)
    if keras_probs.shape != tflite_probs.shape:
        raise PipelineError(f"{path}: parity check failed, outputs of shape {tflite_probs.shape} "
                            f"vs the Keras model's {keras_probs.shape}")
    diff = float(np.max(np.abs(keras_probs - tflite_probs))) if keras_probs.size else 0.0
    disagree = int(np.sum(keras_probs.argmax(1) != tflite_probs.argmax(1)))
    if disagree or diff > tolerance:
        raise PipelineError(f"{path}: parity check failed against the Keras model: {disagree} different "
                            f"predictions, largest probability difference {diff:.2e} (allowed {tolerance:.0e})")
    return diff
