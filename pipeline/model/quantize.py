"""Quantization-aware training of our layers: TFMOT QuantizeConfigs that fake-quantize each layer's kernels and
quantization points, the annotation of a model, and the scope that loads QAT models."""
import tensorflow as tf
import tensorflow_model_optimization as tfmot
# The prune-preserving weight quantizer is not exported by tfmot's public API (only the scheme is).
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
    cluster_preserve_quantize_registry)
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
    prune_preserve_quantize_registry)

from pipeline.model.encoder import EncoderBlock
from pipeline.model.layers import (PACKAGE, ClassifierHead, ClipTokenIds, LayerNorm, NgramLogits, PaddingMask,
                                   SequencePooling, TokenAndPositionEmbedding, register)
from pipeline.model.mlm import MaskedLMHead

_quant = tfmot.quantization.keras.quantizers
_PrunePreserveQuantizer = prune_preserve_quantize_registry.PrunePreserveDefaultWeightsQuantizer
_ClusterPreserveQuantizer = cluster_preserve_quantize_registry.ClusterPreserveDefaultWeightsQuantizer


@register
class PointQuantizer(_quant.MovingAverageQuantizer):
    """MovingAverageQuantizer whose min/max variables carry the point's name (unique within a layer;
    QuantizeAwareActivation would name all of them 'post_activation_min/max')."""

    def __init__(self, point, num_bits=8, per_axis=False, symmetric=False, narrow_range=False):
        super().__init__(num_bits=num_bits, per_axis=per_axis, symmetric=symmetric, narrow_range=narrow_range)
        self.point = point

    def build(self, tensor_shape, name, layer):
        return super().build(tensor_shape, f"{self.point}_{name}", layer)

    def get_config(self):
        return {**super().get_config(), "point": self.point}


@register
class LiteformerQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """QuantizeConfig for our layers: kernels (and the embedding matrix) fake-quantized with
    LastValueQuantizer (8 bits, per-tensor, symmetric, narrow range), every quantization point of the
    layer with MovingAverageQuantizer (attention probabilities: FixedQuantizer [0, 1]), and the layer
    output with MovingAverageQuantizer (unless quantize_output=False).

    Per-tensor only: per-axis kernels train, but TF 2.21's TFLite converter rejects them for these
    matmuls ("'tfl.transpose' op has mismatched quantized axes of input and output"); TFMOT's own
    Dense config is per-tensor for the same reason."""

    def __init__(self, num_bits=8, quantize_output=True, preserve_sparsity=False, float_points=(),
                 preserve_clusters=False):
        self.num_bits = int(num_bits)
        self.preserve_clusters = bool(preserve_clusters)  # TFMOT's cluster-preserving quantizer (CQAT)
        self.quantize_output = bool(quantize_output)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.float_points = tuple(float_points)  # points left without fake-quant: float islands in the export

    def _points(self, layer):
        return {k: v for k, v in layer._quant_points().items() if k not in self.float_points}

    def get_weights_and_quantizers(self, layer):
        # TFMOT's prune-preserving quantizer (of Default8BitPrunePreserveQuantizeScheme) multiplies the
        # kernel by its zero mask, taken when the QAT model is built, before fake-quantizing it.
        # TFMOT's cluster-preserving one trains the centroids of a clustered kernel, not its elements.
        args = dict(num_bits=self.num_bits, per_axis=False, symmetric=True, narrow_range=True)
        if self.preserve_clusters:
            clustered = {w.ref() for _, w in layer.get_clusterable_weights()}
            return [(getattr(layer, name), _ClusterPreserveQuantizer(**args, preserve_sparsity=self.preserve_sparsity)
                     if getattr(layer, name).ref() in clustered else _quant.LastValueQuantizer(**args))
                    for name in layer._quantizable_weights()]
        quantizer = _PrunePreserveQuantizer if self.preserve_sparsity else _quant.LastValueQuantizer
        return [(getattr(layer, name), quantizer(**args)) for name in layer._quantizable_weights()]

    def set_quantize_weights(self, layer, quantize_weights):
        layer._set_weight_overrides(zip(layer._quantizable_weights(), quantize_weights))

    def get_activations_and_quantizers(self, layer):
        out = []
        for name, fn in self._points(layer).items():
            if name == "probs":
                quantizer = _quant.FixedQuantizer(num_bits=self.num_bits, init_min=0.0, init_max=1.0,
                                                  narrow_range=False)
            else:
                quantizer = PointQuantizer(name, num_bits=self.num_bits)
            out.append((fn, quantizer))
        return out

    def set_quantize_activations(self, layer, quantize_activations):
        layer._set_point_overrides(zip(self._points(layer), quantize_activations))

    def get_output_quantizers(self, layer):
        if not self.quantize_output:
            return []
        return [_quant.MovingAverageQuantizer(num_bits=self.num_bits, per_axis=False, symmetric=False,
                                              narrow_range=False)]

    def get_config(self):
        return {"num_bits": self.num_bits, "quantize_output": self.quantize_output,
                "preserve_sparsity": self.preserve_sparsity, "float_points": list(self.float_points),
                "preserve_clusters": self.preserve_clusters}


_QAT_LAYERS = (TokenAndPositionEmbedding, EncoderBlock, LayerNorm, SequencePooling, ClassifierHead)
_NO_QAT_LAYERS = (ClipTokenIds, PaddingMask, NgramLogits)  # int32 consumers: must stay unannotated


def custom_objects():
    """Every class the model's modules register (and TFMOT's preserving quantizers), by plain and registered name."""
    classes = (ClipTokenIds, PaddingMask, TokenAndPositionEmbedding, EncoderBlock, LayerNorm,
               SequencePooling, NgramLogits, ClassifierHead, MaskedLMHead, PointQuantizer, LiteformerQuantizeConfig)
    objects = {cls.__name__: cls for cls in classes}
    objects[_PrunePreserveQuantizer.__name__] = _PrunePreserveQuantizer
    objects[_ClusterPreserveQuantizer.__name__] = _ClusterPreserveQuantizer
    objects.update({f"{PACKAGE}>{cls.__name__}": cls for cls in classes})
    return objects


def qat_scope():
    """tfmot quantize_scope with our layers and configs (for quantize_apply and loading QAT models)."""
    return tfmot.quantization.keras.quantize_scope(custom_objects())


def annotate_for_qat(model: tf.keras.Model, num_bits: int = 8, preserve_sparsity: bool = False,
                     float_points=(), preserve_clusters: bool = False) -> tf.keras.Model:
    """A clone of `model` (sharing its layers) with every layer annotated for QAT: our layers with
    LiteformerQuantizeConfig, any built-in layer with TFMOT's default registry. ClipTokenIds and
    PaddingMask are left alone (their inputs are int32, see the module docstring).

    Then: `with qat_scope(): qat = tfmot.quantization.keras.quantize_apply(annotated)` (float32 only:
    FakeQuant ops have no bfloat16/float16 kernels)."""
    annotate = tfmot.quantization.keras.quantize_annotate_layer

    def _annotate(layer):
        if isinstance(layer, _NO_QAT_LAYERS):
            return layer
        if isinstance(layer, _QAT_LAYERS):
            # The head's output is the float probabilities: its logits are quantized, not its output
            # (as TFMOT does for softmax).
            return annotate(layer, LiteformerQuantizeConfig(
                num_bits=num_bits, quantize_output=not isinstance(layer, ClassifierHead),
                preserve_sparsity=preserve_sparsity, float_points=float_points,
                preserve_clusters=preserve_clusters))
        return annotate(layer)  # any built-in layer: TFMOT's default registry

    with qat_scope():
        return tf.keras.models.clone_model(model, clone_function=_annotate)


class _PrunePreserveScheme(tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme):
    """TFMOT's prune-preserving scheme, except that its registry claims every weightless layer and then
    fails on ours (ClipTokenIds, PaddingMask: "get_quantize_config() called on an unsupported layer")."""

    def get_quantize_registry(self):
        registry = super().get_quantize_registry()
        supports = registry.supports
        registry.supports = lambda layer: not isinstance(layer, _NO_QAT_LAYERS) and supports(layer)
        return registry


def quantize_scheme(preserve_sparsity: bool = False):
    """TFMOT's 8-bit scheme for quantize_apply; preserve_sparsity: its prune-preserving one (_PrunePreserveScheme)."""
    return (_PrunePreserveScheme() if preserve_sparsity
            else tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme())


def quantize_model(model: tf.keras.Model, num_bits: int = 8, preserve_sparsity: bool = False,
                   float_points=(), preserve_clusters: bool = False) -> tf.keras.Model:
    """annotate_for_qat + quantize_apply: a QAT model initialised with `model`'s weights (a copy: the
    float model is not changed by training the QAT model). preserve_sparsity: TFMOT's collaborative
    prune-preserving scheme, so the zeros of a pruned model stay zero in the quantized kernels."""
    annotated = annotate_for_qat(model, num_bits=num_bits, preserve_sparsity=preserve_sparsity,
                                 float_points=float_points, preserve_clusters=preserve_clusters)
    with qat_scope():
        return tfmot.quantization.keras.quantize_apply(annotated, quantize_scheme(preserve_sparsity))
