"""One config for every stage: dataclasses with defaults, read from params.yaml, overridable by --set; and the
steps a compression recipe (compress.variants) may chain, checked here without TensorFlow."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_text

# ---------------------------------------------------------------- compression recipes (compress.variants)
# Each .tflite variant is a chain of these steps; pipeline/export/recipes.py has the function behind each one.

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


# The language model's recipes (lm.variants): its steps are a subset of the classifier's (no student, low-rank
# or clustering); pipeline/lm/compress.py runs them.
LM_STEPS = ("prune", "qat", "prune_qat", "float32", "dynamic_range", "float16", "int8")
LM_DEFAULT_VARIANTS = {
    "float32": ["float32"],
    "dynamic_range": ["dynamic_range"],
    "float16": ["float16"],
    "int8": ["int8"],
    # tinyshakespeare: 0.0003 bits/char from float, 2.25 MB gzipped (dynamic_range: 0.0008, 2.48 MB)
    "pruned_dynamic_range": ["prune", "dynamic_range"],
}
# lm keys that configure compress and report, left out of the train stage's key (changing them retrains nothing)
LM_COMPRESS_KEYS = ("variants", "sparsity", "prune_steps", "qat_steps", "tune_learning_rate", "ship_margin")


def check_lm_variants(variants, where):
    """Raise a one-line PipelineError unless `variants` maps names to chains of LM_STEPS ending in one export."""
    check_variants(variants, where, key="lm.variants")
    for name, steps in variants.items():
        bad = [s for s in steps if s not in LM_STEPS]
        if bad:
            raise PipelineError(f"{where}: lm.variants.{name}: step '{bad[0]}' is not one of the language model's "
                                f"({', '.join(LM_STEPS)})")
    return variants


def check_variants(variants, where, key="compress.variants"):
    """Raise a one-line PipelineError unless `variants` maps names to valid chains of steps."""
    if not isinstance(variants, dict) or not variants:
        raise PipelineError(f"{where}: {key} must map variant names to lists of steps")
    if variants.get("float32") != ["float32"]:
        raise PipelineError(f"{where}: {key} needs float32: [float32] (the parity check's reference)")
    for name, steps in variants.items():
        at = f"{where}: {key}.{name}"
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


# ---------------------------------------------------------------- the config


@dataclass
class PathsConfig:
    data: str = "data"  # raw downloads under data/raw, processed runs under data/processed
    models: str = "saved_models"
    runs: str = "runs"  # TensorBoard logs


@dataclass
class DataConfig:
    text_column: str = "sentence"  # "text" is accepted when this column is absent
    label_column: str = "label"
    vocab_size: int = 8000
    max_seq_len: int = 1024  # cap on the sequence length, [CLS] and [SEP] included (model.max_encoder_len: the encoder's)
    length_percentile: float = 100.0  # sequence length = this percentile of train token lengths (100: longest)
    dev_fraction: float = 0.1  # held out of train (stratified) when the data has no dev split
    seed: int = 1234
    word_vectors: str = "none"  # a `word v1 .. vn` file of pretrained word vectors (pipeline/text/vectors.py), or none
    vector_words: int = 50000  # the most frequent words with a vector that join the vocabulary
    task: str = "auto"  # classify, lm (a causal language model), or auto: lm for a directory of plain .txt files


@dataclass
class ModelConfig:
    d_model: int = 128
    num_layers: int = 1
    num_heads: int = 4
    ff_dim: int = 256
    conv_width: int = 5  # tokens in each block's convolution ahead of attention (odd); 0: none
    dropout: float = 0.2
    token_dropout: float = 0.0  # fraction of word embeddings zeroed in training (word dropout)
    position: str = "sinusoidal"  # or "learned"
    pooling: str = "mean"  # masked mean over tokens, or "cls"
    max_encoder_len: int = 512  # the encoder reads a text's first this many wordpieces (a backbone: at most its
    # positions); the n-gram term reads all data.max_seq_len
    ngram_order: int = 3  # bag-of-n-grams logits added to the Transformer's (1-3); 0: none
    ngram_max_rows: int = 20000  # ... only when the train split has at most this many rows; 0: any number
    ngram_buckets: int = 131072  # hash buckets for each of bigrams and trigrams
    # a pretrained BERT to fine-tune (pipeline/model/backbone.py): a known name, or a directory with config.json,
    # vocab.txt and model.safetensors; it sets the vocabulary, the encoder's shape and dropout (d_model ..
    # position above are then unused). none: the encoder above, from scratch
    backbone: str = "all-minilm-l6-v2"


@dataclass
class TrainConfig:
    epochs: int = 3  # at least; more when that is fewer than min_steps optimizer steps
    min_steps: int = 500  # small data sets train for more epochs (early stopping still ends them)
    max_steps: int = 2000  # > 0: training stops after this many steps, mid-epoch if need be (large data sets)
    max_tokens: int = 800_000  # > 0: ... or after about this many wordpieces (long texts: a step costs more)
    batch_size: int = 32
    learning_rate: float = 5e-5  # fine-tuning a backbone; from scratch (model.backbone none): 1e-3
    warmup_fraction: float = 0.1  # of all steps, then linear decay to zero
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    patience: int = 2  # early stopping, in epochs without improvement of `monitor`
    monitor: str = "val_loss"  # or "val_accuracy"
    seed: int = 42
    mixed_precision: str = "mixed_bfloat16"  # "float32", or "mixed_float16" (GPU); bfloat16 needs a CPU with bfloat16 units
    strategy: str = "default"  # "mirrored", or "multi_worker" (TF_CONFIG; batch_size is the global batch)
    bucketing: bool = True  # batch by similar length; False pads every batch to the max length
    class_weight: str = "balanced"  # loss weight n / (classes * count) per class; "none": every row 1
    ngram_c: float = 4.0  # inverse L2 strength of the n-gram logistic regression (model.ngram_order)
    init: str = "pretrained"  # start from `make pretrain`'s encoder when the run has one; "scratch": never
    # differentially private training (DP-SGD, pipeline/model/privacy.py): each example's gradient clipped to
    # privacy_l2_norm_clip, Gaussian noise added; ε at δ = 1/n is printed and recorded (metrics.json "privacy")
    privacy: bool = False
    privacy_l2_norm_clip: float = 1.0
    privacy_noise_multiplier: float = 0.0  # noise std / clip; 0: the smallest meeting privacy_target_epsilon
    privacy_target_epsilon: float = 0.0  # > 0 (instead of a noise multiplier): ε at δ = 1/n at most this
    privacy_microbatches: int = 0  # clipped groups per batch (a divisor of batch_size); 0: one per example
    # what DP-SGD trains: "head" (the classifier on the pretrained backbone's features, frozen; the noise then
    # covers a few hundred weights, not millions) or "all" (the whole model; needed without a backbone)
    privacy_train: str = "head"
    privacy_head_learning_rate: float = 0.01  # with privacy_train head (train.learning_rate suits fine-tuning)


@dataclass
class PretrainConfig:
    epochs: int = 10  # over the train split's texts and the unlabelled texts
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    mask_rate: float = 0.15  # wordpieces selected per text; of those 80% -> [MASK], 10% random, 10% kept
    seed: int = 42


@dataclass
class DistillConfig:
    # The teacher is the run's trained model; the student is model.* with these four overridden. It keeps
    # the teacher's n-gram term, frozen, and learns the rest from the teacher's soft labels.
    student_d_model: int = 64
    student_num_heads: int = 2
    student_ff_dim: int = 128
    student_num_layers: int = 2
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the gold-label cross-entropy beside T^2 * KL(teacher || student)
    vector_weight: float = 0.5  # of 1 - cos(teacher's pooled vector, the student's linearly projected to its width)
    augment_copies: int = 4  # augmented copies of each train text in the transfer set (Tang et al. 2019)
    mask_prob: float = 0.1  # of an augmented copy's wordpieces, replaced by [MASK]
    ngram_prob: float = 0.25  # chance an augmented copy is cut to a random window of 1-5 wordpieces
    epochs: int = 5  # over the transfer set, at least (train.min_steps); the best epoch on dev is kept
    batch_size: int = 256
    learning_rate: float = 3e-3


@dataclass
class CompressConfig:
    sparsity: float = 0.8  # final fraction of zeros in every pruned kernel
    prune_epochs: float = 2.0  # fine-tuning while pruning; sparsity ramps up over the first 60%
    qat_epochs: float = 1.0  # quantization-aware fine-tuning (the qat, prune_qat and cluster_qat steps)
    learning_rate: float = 2e-5  # peak of the fine-tuning schedule (warmup then linear decay); from scratch: 1e-4
    student_learning_rate: float = 1e-4  # the same for recipes that start from the distilled student ...
    student_sparsity: float = 0.3  # ... and their prune step's sparsity (SST-2: 0.5 cost 0.4 points more than 0.3)
    pruning_frequency: int = 50  # steps between mask updates
    calibration_samples: int = 500  # training sentences for int8 post-training calibration
    parity_tolerance: float = 1e-4  # max |p_keras - p_float32.tflite| on dev
    fine_tune_epochs: float = 1.0  # the fine_tune step (after lowrank)
    lowrank_energy: float = 0.7  # rank of each kernel: fewest singular values keeping this share of sum(s^2)
    lowrank_rank: int = 0  # > 0: this fixed rank for every kernel instead
    clusters: int = 16  # centroids per kernel (k-means++) of the cluster step
    cluster_epochs: float = 1.0  # fine-tuning while clustered
    # ops the int8 exports keep in float32: XNNPACK has no int8 kernel for the first ten, and each one left int8
    # splits the graph into another delegate partition on builtin kernels. MEAN, SUB, MUL: LayerNorm and the
    # attention mask in float (a fine-tuned MiniLM's int8 file: 79.2 -> 86.3 on SST-2 sentences); []: full int8
    float_ops: list = field(default_factory=lambda: ["SOFTMAX", "BATCH_MATMUL", "GELU", "RSQRT", "SQUARED_DIFFERENCE",
                                                     "DIV", "MINIMUM", "MAXIMUM", "ADD", "LOG", "MEAN", "SUB", "MUL"])
    variants: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_VARIANTS.items()})


@dataclass
class ReportConfig:
    ship: str = "smallest"  # the variant in mobile/: a goal (smallest, fastest, most_accurate) or a variant name


# The search's default space (make search): each key a list of choices; the config's own value must be one of them,
# so that trial 0, the config as it is, is a point of the space.
DEFAULT_SPACE = {
    "model.num_layers": [1, 2],
    "model.d_model": [64, 128],
    "model.num_heads": [2, 4],
    "model.ff_dim": [128, 256],
    "model.max_encoder_len": [32, 64, 512],  # the encoder's sequence length cap (the n-gram term reads all)
    "model.dropout": [0.1, 0.2, 0.3],
    "model.ngram_order": [0, 3],  # with or without the bag-of-n-grams term
    "train.ngram_c": [1.0, 4.0, 16.0],  # the n-gram term's regularisation: on small data it sets most of the quality
    "train.learning_rate": [0.0005, 0.001, 0.002],
    "train.batch_size": [32, 64],
    "compress.calibration_samples": [100, 500],
    # ops the int8 file keeps in float32: the default list, or fully int8 (faster where XNNPACK has int8 kernels)
    "compress.float_ops": [list(CompressConfig().float_ops), []],
}
# A backbone run's search varies its distilled student (the teacher, the run's trained model, stays): only
# distill.* and compress.* keys, so that every trial reuses the teacher's labels of the transfer set.
DEFAULT_STUDENT_SPACE = {
    "distill.student_num_layers": [1, 2, 3],
    "distill.student_d_model": [64, 96, 128],
    "distill.student_num_heads": [2, 4],
    "distill.student_ff_dim": [128, 256],
    "distill.temperature": [1.0, 2.0, 4.0],
    "distill.alpha": [0.0, 0.5, 1.0],
    "distill.vector_weight": [0.0, 0.5, 1.0],
    "distill.learning_rate": [0.001, 0.003],
    "compress.calibration_samples": [100, 500],
    "compress.float_ops": [list(CompressConfig().float_ops), []],
}


@dataclass
class SearchConfig:
    trials: int = 20  # finished trials (trial 0: the config itself) after which the study stops
    timeout: int = 3600  # seconds this invocation may take; a trial it would cut is stopped and retried on resume
    objective: str = "latency"  # the cost beside dev macro F1: int8 p50 latency at 1 thread, or the file's size
    seed: int = 0  # the TPE sampler's
    prune_warmup: int = 2  # epochs before a trial may be stopped early
    prune_margin: float = 0.1  # ... when its dev accuracy at an epoch is this far below the median of finished trials
    latency_tolerance: float = 0.1  # the chosen trial's p50 may exceed the config's own trial's by this share (noise)
    space: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_SPACE.items()})
    student_space: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_STUDENT_SPACE.items()})


@dataclass
class LMSection:
    """The language model's keys (data.task lm); the defaults are pipeline/lm/config.py's LMConfig's."""
    context: int = 128  # tokens a window holds
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    ngram_order: int = 6  # > 0: a hashed n-gram logit table of this order in the model
    ngram_buckets: int = 262139  # its rows for one context length at most
    batch_size: int = 32
    steps: int = 1800
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    mixed_precision: str = "mixed_bfloat16"
    eval_every: int = 300  # dev bits per character (of the first eval_chars characters) every this many steps
    seed: int = 0
    baseline_order: int = 7  # the Kneser-Ney n-gram baseline's order
    # compress / report of the language model (not part of the train stage's key: see LM_COMPRESS_KEYS)
    variants: dict = field(default_factory=lambda: {k: list(v) for k, v in LM_DEFAULT_VARIANTS.items()})
    sparsity: float = 0.5  # final fraction of zeros in every pruned kernel and in the n-gram table
    prune_steps: int = 200  # fine-tuning steps on train windows while pruning (sparsity ramps over the first 60%)
    qat_steps: int = 100  # quantization-aware fine-tuning steps (qat, prune_qat)
    tune_learning_rate: float = 3e-4  # peak learning rate of those fine-tunings (warmup 10%, linear decay)
    ship_margin: float = 0.05  # report.ship smallest / fastest: within this many bits per char of the best .tflite


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    lm: LMSection = field(default_factory=LMSection)

    def to_dict(self, lm=False):
        """Every section; without lm=True not the language model's (lm, data.task), so the classifier's stage
        keys and config.yaml stay what they were before the lm task."""
        out = dataclasses.asdict(self)
        if not lm:
            out.pop("lm")
            out["data"].pop("task")
        return out


CHOICES = {
    "model.position": ("sinusoidal", "learned"),
    "model.pooling": ("mean", "cls"),
    "train.monitor": ("val_loss", "val_accuracy"),
    "train.mixed_precision": ("float32", "mixed_float16", "mixed_bfloat16"),
    "train.strategy": ("default", "mirrored", "multi_worker"),
    "train.class_weight": ("balanced", "none"),
    "train.init": ("pretrained", "scratch"),
    "data.task": ("auto", "classify", "lm"),
    "lm.mixed_precision": ("float32", "mixed_bfloat16"),
    "search.objective": ("latency", "size"),
}
GOALS = ("smallest", "fastest", "most_accurate")  # report.ship: one of these, or a variant of compress.variants


def _key_lines(text):
    """Map 'section.key' to its line number in the YAML text, for error messages."""
    lines = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[k.value] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for kk, _ in v.value:
                    lines[f"{k.value}.{kk.value}"] = kk.start_mark.line + 1
    return lines


def _coerce(value, default, where):
    """Check `value` against the type of the default; ints are accepted where floats are."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise PipelineError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(cfg, dotted, value, where):
    section, _, key = dotted.partition(".")
    if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
        raise PipelineError(f"{where}: unknown section '{section}' (sections: {', '.join(f.name for f in dataclasses.fields(cfg))})")
    sub = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(sub)]
    if key not in names:
        raise PipelineError(f"{where}: unknown key '{dotted}' (keys of '{section}': {', '.join(names)})")
    value = _coerce(value, getattr(sub, key), where)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise PipelineError(f"{where}: '{dotted}' must be one of {', '.join(CHOICES[dotted])}, got {value!r}")
    if dotted == "compress.variants":
        check_variants(value, where)
    if dotted == "lm.variants":
        check_lm_variants(value, where)
    if dotted == "search.space":
        check_space(value, where)
    if dotted == "search.student_space":
        check_space(value, where, "student_space", sections=("distill", "compress"))
    setattr(sub, key, value)


def check_privacy(t, backbone, wheres):
    """Raise a one-line PipelineError unless train.privacy's keys make a DP-SGD run (or privacy is off)."""
    def fail(key, problem):
        raise PipelineError(f"{wheres.get(key, wheres.get('train.privacy', key))}: '{key}' {problem}")
    if not t.privacy:
        return
    if t.privacy_l2_norm_clip <= 0:
        fail("train.privacy_l2_norm_clip", f"must be > 0, got {t.privacy_l2_norm_clip}")
    for key, value in (("train.privacy_noise_multiplier", t.privacy_noise_multiplier),
                       ("train.privacy_target_epsilon", t.privacy_target_epsilon)):
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if (t.privacy_noise_multiplier > 0) == (t.privacy_target_epsilon > 0):
        fail("train.privacy", "needs exactly one of train.privacy_noise_multiplier and train.privacy_target_epsilon "
                              f"> 0, got {t.privacy_noise_multiplier} and {t.privacy_target_epsilon}")
    if t.privacy_microbatches < 0 or (t.privacy_microbatches and t.batch_size % t.privacy_microbatches):
        fail("train.privacy_microbatches", f"must be 0 or divide train.batch_size {t.batch_size}, got {t.privacy_microbatches}")
    if t.strategy != "default":
        fail("train.strategy", f"must be default with train.privacy (DP-SGD runs on one device here), got {t.strategy!r}")
    if t.privacy_train not in ("head", "all"):
        fail("train.privacy_train", f"must be head or all, got {t.privacy_train!r}")
    if t.privacy_train == "head" and backbone == "none":  # named where the backbone was turned off
        raise PipelineError(f"{wheres.get('model.backbone', wheres.get('train.privacy', 'model.backbone'))}: "
                            "'train.privacy_train' head trains the classifier on a pretrained backbone's features, "
                            "and model.backbone is none: set train.privacy_train=all")
    if t.privacy_train == "head" and t.privacy_head_learning_rate <= 0:
        fail("train.privacy_head_learning_rate", f"must be > 0, got {t.privacy_head_learning_rate}")


def load_config(path=None, overrides=()):
    """Defaults, then the YAML file at `path` (if any), then 'section.key=value' overrides."""
    cfg = Config()
    ship_where = "report.ship"
    wheres = {}  # where each key was last set, for the checks that span keys
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise PipelineError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{path}: expected a mapping of sections")
        lines = _key_lines(text)
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise PipelineError(f"{path}:{lines.get(section, '?')}: section '{section}' must be a mapping")
            for key, value in values.items():
                dotted = f"{section}.{key}"
                _apply(cfg, dotted, value, f"{path}:{lines.get(dotted, '?')}")
                wheres[dotted] = f"{path}:{lines.get(dotted, '?')}"
                ship_where = f"{path}:{lines.get(dotted, '?')}" if dotted == "report.ship" else ship_where
    for item in overrides:
        dotted, sep, text_value = item.partition("=")
        if not sep:
            raise PipelineError(f"--set {item}: expected section.key=value")
        try:
            value = yaml.safe_load(text_value)
        except yaml.YAMLError:
            value = text_value
        if value is None:
            value = text_value
        _apply(cfg, dotted.strip(), value, f"--set {item}")
        wheres[dotted.strip()] = f"--set {item}"
        ship_where = f"--set {item}" if dotted.strip() == "report.ship" else ship_where
    check_privacy(cfg.train, cfg.model.backbone, wheres)
    # checked last: the variants it may name can be set after it
    lm_only = tuple(n for n in cfg.lm.variants if n not in cfg.compress.variants)
    if cfg.report.ship not in GOALS + tuple(cfg.compress.variants) + lm_only:
        raise PipelineError(f"{ship_where}: 'report.ship' must be one of "
                            f"{', '.join(GOALS + tuple(cfg.compress.variants))}, got {cfg.report.ship!r}"
                            f" (a language-model run: also {', '.join(lm_only) or 'none'})")
    return cfg


def check_space(space, where, name="space", sections=None):
    """Raise a one-line PipelineError unless `space` maps config keys (not search.*, paths.*; only `sections` when
    given) to non-empty lists of values each key accepts."""
    if not isinstance(space, dict) or not space:
        raise PipelineError(f"{where}: search.{name} must map section.key names to lists of choices")
    for dotted, choices in space.items():
        at = f"{where}: search.{name}.{dotted}"
        if not isinstance(dotted, str) or dotted.startswith(("search.", "paths.")) or "." not in dotted:
            raise PipelineError(f"{at}: expected a section.key of the config (not search.* or paths.*)")
        if sections and dotted.partition(".")[0] not in sections:
            raise PipelineError(f"{at}: only {' and '.join(s + '.*' for s in sections)} keys (the teacher, the run's "
                                f"trained model, stays as it is)")
        if not isinstance(choices, list) or not choices:
            raise PipelineError(f"{at}: expected a non-empty list of choices")
        for choice in choices:
            _apply(Config(), dotted, choice, at)
    return space


def check_space_holds(cfg, where, name="space"):
    """Each key of search.<name> has the config's own value among its choices (trial 0 measures the config itself)."""
    for dotted, choices in getattr(cfg.search, name).items():
        section, _, key = dotted.partition(".")
        value = getattr(getattr(cfg, section), key)
        if not any(_value(dotted, c) == value for c in choices):
            raise PipelineError(f"{where}: search.{name}.{dotted} must include the config's own value {value!r} "
                                f"(trial 0 measures the config as it is)")


def _value(dotted, choice):
    """`choice` as the config holds it (ints given for floats become floats)."""
    cfg = Config()
    _apply(cfg, dotted, choice, dotted)
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def save_config(cfg, path, lm=False):
    write_text(path, yaml.safe_dump(cfg.to_dict(lm=lm), sort_keys=False))
