"""Compression recipes: each .tflite variant is a chain of steps (compress.variants in params.yaml),
validated here without TensorFlow; pipeline/compress.py implements the steps."""
from pipeline.core.errors import PipelineError

# Steps that change the Keras model, in the order they may appear; "student" only first.
MODEL_STEPS = {
    "student": "start from the distilled student (the variant is built when the run has one)",
    "prune": "magnitude pruning to compress.sparsity while fine-tuning",
    "lowrank": "factorise every encoder kernel W into U·V (compress.lowrank_energy or lowrank_rank)",
    "cluster": "k-means weight clustering (compress.clusters) while fine-tuning, then strip",
    "fine_tune": "plain fine-tuning for compress.fine_tune_epochs",
    "qat": "quantization-aware fine-tuning",
    "prune_qat": "prune-preserving quantization-aware fine-tuning",
    "cluster_qat": "cluster-preserving quantization-aware fine-tuning",
}
# Steps that write the .tflite file: the last step of every recipe.
EXPORT_STEPS = {
    "float32": "no optimization",
    "dynamic_range": "int8 weights, float activations",
    "float16": "float16 weights",
    "int8": "int8 weights and activations; the ops in compress.float_ops stay float32 (kernels per tensor after cluster)",
}
STEPS = {**MODEL_STEPS, **EXPORT_STEPS}

# Built by default: the trained model exported as it is, and the distilled student (when the run has one, or
# compress distils it: a backbone run) exported as it is and pruned + QAT-trained.
DEFAULT_VARIANTS = {
    "float32": ["float32"],
    "dynamic_range": ["dynamic_range"],
    "float16": ["float16"],
    "int8": ["int8"],
    "distilled_float32": ["student", "float32"],
    "distilled_int8": ["student", "int8"],
    # the distilled student pruned, then quantization-aware trained keeping its zeros (TFMOT), then int8
    "distilled_pruned_qat_int8": ["student", "prune", "prune_qat", "int8"],
}
# Recipes that fine-tune while compressing: they shrink a from-scratch model (model.backbone: none) at a small
# cost, but in the few epochs compress gives them they ruin a fine-tuned backbone (tweet_emotion dev: 12 to 51
# points lost) and take most of compress's time, so they run only when compress.variants lists them.
FINE_TUNED_VARIANTS = {
    "pruned_int8": ["prune", "int8"],
    "qat_int8": ["qat", "int8"],
    "pruned_qat_int8": ["prune", "prune_qat", "int8"],
    "lowrank_int8": ["lowrank", "fine_tune", "int8"],
    "clustered_qat_int8": ["prune", "cluster", "cluster_qat", "int8"],  # TFMOT's prune-cluster-QAT chain
}


def check_variants(variants, where):
    """Raise a one-line PipelineError unless `variants` maps names to valid chains of steps."""
    if not isinstance(variants, dict) or not variants:
        raise PipelineError(f"{where}: compress.variants must map variant names to lists of steps")
    if variants.get("float32") != ["float32"]:
        raise PipelineError(f"{where}: compress.variants needs float32: [float32] (the parity check's reference)")
    for name, steps in variants.items():
        at = f"{where}: compress.variants.{name}"
        if name in MODEL_STEPS or "+" in name:
            raise PipelineError(f"{at}: a variant cannot be named like a step or contain '+'")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise PipelineError(f"{at}: expected a non-empty list of steps")
        for i, step in enumerate(steps):
            if step not in STEPS:
                raise PipelineError(f"{at}: unknown step '{step}' (steps: {', '.join(STEPS)})")
            if (step in EXPORT_STEPS) != (i == len(steps) - 1):
                raise PipelineError(f"{at}: '{step}' at position {i + 1}; a recipe ends with exactly one export "
                                    f"({', '.join(EXPORT_STEPS)})")
            if step == "student" and i:
                raise PipelineError(f"{at}: 'student' can only be the first step")
    return variants
