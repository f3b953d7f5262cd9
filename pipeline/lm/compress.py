"""The language model's compression recipes (lm.variants): chains of TFMOT steps that fine-tune a copy of the
trained model on train windows (prune: magnitude pruning; qat: quantization-aware training; prune_qat: QAT
that keeps the pruned zeros), each chain ending in one of export.py's .tflite modes.

QAT reuses the classifier's LiteformerQuantizeConfig (pipeline/model/quantize.py) for the embedding, the
blocks and the final norm. Its fake-quantized model trains the float weights to sit well on an int8 grid;
the exported file is the plain model with those weights, quantized by the converter as `int8` is (TFLite
cannot take the QAT graph's ranges here: the decode signature is a different graph from the trained one)."""
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from pipeline.export.recipes import PRUNE_RAMP, clone
from pipeline.lm.model import HashedNgramLogits, TiedEmbedding, lm_custom_objects
from pipeline.lm.windows import training_dataset
from pipeline.model.encoder import EncoderBlock
from pipeline.model.layers import LayerNorm
from pipeline.model.quantize import LiteformerQuantizeConfig, qat_scope, quantize_scheme
from pipeline.model.training import WarmupLinearDecay, make_optimizer

MODEL_STEPS = ("prune", "qat", "prune_qat")


@dataclasses.dataclass
class Tuning:
    """What the fine-tuning steps read: train tokens and the lm section's compress keys."""
    tokens: list
    context: int
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 0.1
    sparsity: float = 0.5
    prune_steps: int = 200
    qat_steps: int = 100
    seed: int = 0


def copy_model(model):
    """recipes.clone (an independent copy with the same weights) with the language model's layers known."""
    with tf.keras.utils.custom_object_scope(lm_custom_objects()):
        return clone(model)


def _fit(model, tuning, steps, callbacks=()):
    """`steps` batches of random train windows, AdamW warming up over 10% then decaying linearly to zero."""
    optimizer = make_optimizer(WarmupLinearDecay(tuning.learning_rate, max(1, steps // 10), steps),
                               tuning.weight_decay)
    # as in training: no decay of norms, biases or the n-gram table (its rows are log-probabilities)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "norm", "table"])
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = training_dataset(tuning.tokens, tuning.context, tuning.batch_size, seed=tuning.seed)
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=2, callbacks=list(callbacks))


def prune_lm(model, tuning):
    """Magnitude-prune every prunable weight (embedding, block kernels, n-gram table) of a copy of `model` to
    tuning.sparsity while fine-tuning for tuning.prune_steps; the wrappers stripped."""
    steps = tuning.prune_steps
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=tuning.sparsity, begin_step=0,
        end_step=max(1, int(PRUNE_RAMP * steps)), frequency=max(1, min(50, steps // 4)))
    with tf.keras.utils.custom_object_scope(lm_custom_objects()):
        pruned = tfmot.sparsity.keras.prune_low_magnitude(copy_model(model), pruning_schedule=schedule)
        _fit(pruned, tuning, steps, [tfmot.sparsity.keras.UpdatePruningStep()])
        return tfmot.sparsity.keras.strip_pruning(pruned)


def _annotate(layer, preserve_sparsity):
    """Our float layers with the classifier's QuantizeConfig; the int32 consumers (ids, mask, n-gram table
    lookup), the float32 logits' Activation / Add and anything else stay unannotated."""
    if isinstance(layer, (TiedEmbedding, EncoderBlock, LayerNorm)):
        # the tied embedding's second output is the logits: not quantized (as TFMOT leaves softmax outputs),
        # and one output range could not serve both embeddings and logits
        config = LiteformerQuantizeConfig(quantize_output=not isinstance(layer, TiedEmbedding),
                                          preserve_sparsity=preserve_sparsity)
        return tfmot.quantization.keras.quantize_annotate_layer(layer, config)
    return layer


def qat_lm(model, tuning, preserve_sparsity=False):
    """Quantization-aware fine-tuning of a copy of `model` for tuning.qat_steps (preserve_sparsity: TFMOT's
    prune-preserving quantizer keeps a pruned model's zeros); returns the plain model with the trained weights."""
    with qat_scope(), tf.keras.utils.custom_object_scope(lm_custom_objects()):
        annotated = tf.keras.models.clone_model(copy_model(model),
                                                clone_function=lambda l: _annotate(l, preserve_sparsity))
        qat = tfmot.quantization.keras.quantize_apply(annotated, quantize_scheme(preserve_sparsity))
    _fit(qat, tuning, tuning.qat_steps)
    return plain_from_qat(model, qat, keep_zeros=preserve_sparsity)


def plain_from_qat(model, qat, keep_zeros=False):
    """A copy of `model` holding the QAT model's trained float weights (its fake-quant ranges dropped);
    keep_zeros: every weight that was zero in `model` is zero again."""
    plain = copy_model(model)
    for layer in qat.layers:
        inner = getattr(layer, "layer", layer)  # a QuantizeWrapper's layer keeps its original name
        if inner.weights:
            plain.get_layer(inner.name).set_weights(inner.get_weights())
    if keep_zeros:
        plain.set_weights([np.where(before == 0, 0, after).astype(after.dtype)
                           for before, after in zip(model.get_weights(), plain.get_weights())])
    return plain


def weight_sparsity(model, ngram=False):
    """Fraction of exact zeros over the Transformer's prunable weights (embedding, block kernels), or with
    ngram=True over the n-gram table (its rows of contexts never seen in train are zero from the start)."""
    weights = [w.numpy() for layer in model.layers if isinstance(layer, tfmot.sparsity.keras.PrunableLayer)
               and isinstance(layer, HashedNgramLogits) == ngram for w in layer.get_prunable_weights()]
    return float(sum(np.sum(w == 0) for w in weights) / max(1, sum(w.size for w in weights)))


STEP_FUNCTIONS = {"prune": prune_lm, "qat": qat_lm,
                  "prune_qat": lambda model, tuning: qat_lm(model, tuning, preserve_sparsity=True)}


class Chains:
    """The model after each chain of model steps, made once and shared by the recipes that start with it."""

    def __init__(self, trained, tuning):
        self.tuning, self.cache = tuning, {(): trained}

    def model_after(self, steps):
        steps = tuple(steps)
        if steps not in self.cache:
            before = self.model_after(steps[:-1])
            print(f"compress: {'+'.join(steps)} ({steps[-1]} on {'+'.join(steps[:-1]) or 'the trained model'})",
                  flush=True)
            self.cache[steps] = STEP_FUNCTIONS[steps[-1]](before, self.tuning)
        return self.cache[steps]
