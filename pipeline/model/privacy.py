"""DP-SGD for the classifier (train.privacy): tensorflow-privacy's Keras Adam, which clips each example's (or
microbatch's) gradient to an L2 norm and adds Gaussian noise, and the per-example loss it needs."""
import sys

import tensorflow as tf


def make_dp_optimizer(learning_rate, l2_norm_clip, noise_multiplier, microbatches):
    """Adam on DP gradients: the mean of per-microbatch gradients each clipped to l2_norm_clip, plus Gaussian noise
    of std noise_multiplier * l2_norm_clip / microbatches. microbatches 0: one per example."""
    # tensorflow-privacy's package __init__ imports modules this stack lacks (tensorflow-probability, the
    # estimator); this flag, read by that __init__, skips them
    sys.skip_tf_privacy_import = True
    # imported here: only private runs need tensorflow-privacy
    from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import DPKerasAdamOptimizer
    return DPKerasAdamOptimizer(l2_norm_clip=float(l2_norm_clip), noise_multiplier=float(noise_multiplier),
                                num_microbatches=int(microbatches) or None, learning_rate=learning_rate)


def per_example_loss(label_smoothing):
    """Label-smoothed cross-entropy, one value per example (the DP optimizer clips each one's gradient)."""
    return tf.keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing,
                                                   reduction=tf.keras.losses.Reduction.NONE)


def train_only_head(model):
    """Freeze every layer but the classifier head ("probabilities"): DP-SGD then clips and noises its gradient alone."""
    for layer in model.layers:
        layer.trainable = layer.name == "probabilities"
