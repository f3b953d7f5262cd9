"""Build the classifier (or the encoder with its MLM head) from the config, as a functional Keras model; load a
saved one; and the run's model as `make train` builds and initialises it."""
import contextlib
import json
from pathlib import Path

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from pipeline import INPUT_NAMES
from pipeline.core import manifest
from pipeline.core.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.model import ngram
from pipeline.model.backbone import configured_dir, load_backbone_weights
from pipeline.model.encoder import BERT_SCORE_LIMIT, EncoderBlock
from pipeline.model.layers import (ClassifierHead, ClipTokenIds, LayerNorm, NgramLogits, PaddingMask,
                                   SequencePooling, TokenAndPositionEmbedding)
from pipeline.model.mlm import MaskedLMHead
from pipeline.model.quantize import qat_scope
from pipeline.model.spec import backbone_spec, encoder_length, model_config
from pipeline.text import vectors


# ---------------------------------------------------------------- building


def _encode(cfg: ModelConfig, vocab_size: int, max_len: int, inputs, vector_dim=0, embedded_tokens=0, backbone=None):
    """The encoder (the layers `make pretrain` trains and `make train` starts from), applied to symbolic
    inputs of up to max_len positions: (clipped ids, float mask, final-norm output [B, T, d_model]), cut to the
    first encoder_length positions. backbone: a BackboneSpec (backbone.py): BERT's encoder of that
    shape instead of model.*'s."""
    length = encoder_length(cfg, max_len, backbone)
    keep = length if length < max_len else 0
    if backbone is not None:
        return _encode_bert(backbone, vocab_size, length, inputs, keep)
    if cfg.d_model % cfg.num_heads:
        raise PipelineError(f"model.d_model ({cfg.d_model}) must be divisible by model.num_heads ({cfg.num_heads})")
    if cfg.position not in ("sinusoidal", "learned"):
        raise PipelineError(f"model.position must be sinusoidal or learned, got {cfg.position!r}")
    if cfg.conv_width < 0 or cfg.conv_width % 2 == 0 and cfg.conv_width:
        raise PipelineError(f"model.conv_width must be 0 or odd, got {cfg.conv_width}")
    if vocab_size < 1 or max_len < 1:
        raise PipelineError(f"vocab_size and max_len must be positive, got {vocab_size} and {max_len}")
    ids = ClipTokenIds(vocab_size, keep, name="token_ids")(inputs["input_word_ids"])
    mask = PaddingMask(keep, name="padding_mask")(inputs["input_mask"])
    x = TokenAndPositionEmbedding(vocab_size, cfg.d_model, length, position=cfg.position,
                                  dropout=cfg.dropout, token_dropout=cfg.token_dropout, vector_dim=vector_dim,
                                  embedded_tokens=embedded_tokens, name="embedding")(ids)
    for i in range(cfg.num_layers):
        x = EncoderBlock(cfg.d_model, cfg.num_heads, cfg.ff_dim, dropout=cfg.dropout, activation="gelu",
                         conv_width=cfg.conv_width, name=f"encoder_{i}")([x, mask])
    return ids, mask, LayerNorm(name="final_norm")(x)


def _encode_bert(spec, vocab_size: int, max_len: int, inputs, keep=0):
    """BERT's encoder from our layers: LN(word + position + type-0 embedding), then post-LN blocks (no final norm)."""
    if vocab_size != spec.vocab_size:
        raise PipelineError(f"the backbone has {spec.vocab_size} tokens, the run {vocab_size}: its data stage "
                            "used another vocabulary")
    ids = ClipTokenIds(vocab_size, keep, name="token_ids")(inputs["input_word_ids"])
    mask = PaddingMask(keep, name="padding_mask")(inputs["input_mask"])
    x = TokenAndPositionEmbedding(vocab_size, spec.d_model, max_len, position="learned", dropout=spec.dropout,
                                  scale=False, norm_epsilon=spec.epsilon, name="embedding")(ids)
    for i in range(spec.num_layers):
        x = EncoderBlock(spec.d_model, spec.num_heads, spec.ff_dim, dropout=spec.dropout, epsilon=spec.epsilon,
                         norm="post", score_limit=BERT_SCORE_LIMIT, name=f"encoder_{i}")([x, mask])
    return ids, mask, x


def build_model(cfg: ModelConfig, vocab_size: int, num_classes: int, max_len: int, vector_dim=0,
                embedded_tokens=0, backbone=None) -> tf.keras.Model:
    """The functional classifier: dict of int32 inputs [B, T] (T <= max_len, any T) -> probabilities
    [B, num_classes] float32. Layers are created under the current global mixed-precision policy.
    vector_dim, embedded_tokens: the run's word vectors' width and its learned vocabulary's size
    (vectors.model_sizes; 0: none); set_word_vectors fills them. backbone: see _encode."""
    if cfg.pooling not in ("mean", "cls"):
        raise PipelineError(f"model.pooling must be mean or cls, got {cfg.pooling!r}")
    if num_classes < 2:
        raise PipelineError(f"need at least 2 classes, got {num_classes}")
    try:
        ngram.check_sizes(vocab_size, cfg.ngram_order, cfg.ngram_buckets)
    except ValueError as e:  # a config error: one line naming the keys, not a traceback
        raise PipelineError(f"model.ngram_order / model.ngram_buckets: {e}") from None

    inputs = {name: tf.keras.Input(shape=(None,), dtype="int32", name=name) for name in INPUT_NAMES}
    ids, mask, x = _encode(cfg, vocab_size, max_len, inputs, vector_dim, embedded_tokens, backbone)
    x = SequencePooling(cfg.pooling, name="pooling")([x, mask])
    if cfg.ngram_order:
        if encoder_length(cfg, max_len, backbone) < max_len:  # the n-gram term reads the whole text
            ids = ClipTokenIds(vocab_size, name="ngram_token_ids")(inputs["input_word_ids"])
            mask = PaddingMask(name="ngram_padding_mask")(inputs["input_mask"])
        x = [x, NgramLogits(vocab_size, num_classes, cfg.ngram_order, cfg.ngram_buckets, name="ngrams")([ids, mask])]
    probs = ClassifierHead(num_classes, name="probabilities")(x)
    return tf.keras.Model(inputs=inputs, outputs=probs, name="liteformer")


def build_mlm_model(cfg: ModelConfig, vocab_size: int, max_len: int, vector_dim=0, embedded_tokens=0) -> tf.keras.Model:
    """The encoder with a masked-language-model head: {input_word_ids, input_mask [B, T], mask_positions
    [B, P]} int32 -> logits [B, P, vocab_size] float32."""
    names = ("input_word_ids", "input_mask", "mask_positions")
    inputs = {name: tf.keras.Input(shape=(None,), dtype="int32", name=name) for name in names}
    _, _, x = _encode(cfg, vocab_size, max_len, inputs, vector_dim, embedded_tokens)
    logits = MaskedLMHead(vocab_size, name="mlm_head")([x, inputs["mask_positions"]])
    return tf.keras.Model(inputs=inputs, outputs=logits, name="liteformer_mlm")


def logits_model(model: tf.keras.Model) -> tf.keras.Model:
    """A model sharing `model`'s layers and weights whose output is the head's logits, not probabilities."""
    head = model.get_layer("probabilities")
    return tf.keras.Model(model.inputs, head(head.input, logits=True), name=f"{model.name}_logits")


def set_word_vectors(model: tf.keras.Model, table, seen, learned):
    """Give a model's embedding layer the run's word vectors (vectors.load_table), and zero the embeddings of
    tokens no training text has (`seen` False): they would stay random noise; the vector alone speaks for them."""
    layer = model.get_layer("embedding")
    layer.word_vectors.assign(table)
    keep = tf.constant(seen[:learned])[:, None]
    layer.embeddings.assign(tf.where(keep, layer.embeddings, tf.zeros_like(layer.embeddings)))


# ---------------------------------------------------------------- the run's model


def build_run_model(cfg, stats, vocab_size, num_classes, word_vectors):
    """The run's classifier as `make train` builds it (model_config, the word vectors' sizes, the backbone's
    shape), its layers under the current mixed-precision policy."""
    return build_model(model_config(cfg, stats), vocab_size, num_classes, int(stats["seq_len"]),
                       **vectors.model_sizes(word_vectors), backbone=backbone_spec(cfg))


def pretrained_encoder(cfg, model_dir):
    """saved_models/<run>/pretrained when train.init is pretrained and `make pretrain` finished it, else None."""
    if cfg.train.init != "pretrained" or "pretrained" not in manifest.load(model_dir)["artifacts"]:
        return None
    return Path(model_dir) / "pretrained"


def initialize_encoder(cfg, model, model_dir):
    """Copy the backbone's or the pretrained encoder's weights into `model` when there is one to use; return
    "backbone <name>", "pretrained" or "scratch"."""
    directory = configured_dir(cfg)
    if directory:
        load_backbone_weights(model, directory)
        print(f"init: backbone {cfg.model.backbone} ({directory}); model.d_model .. model.dropout unused")
        return f"backbone {cfg.model.backbone}"
    source = pretrained_encoder(cfg, model_dir)
    if source is None:
        why = "train.init is scratch" if cfg.train.init == "scratch" else "no pretrained encoder; `make pretrain` makes one"
        print(f"init: scratch ({why})")
        return "scratch"
    copy_encoder_weights(load_model(source / "model.keras"), model)
    summary = json.loads((source / "summary.json").read_text())
    print(f"init: pretrained encoder from {source} ({summary['epochs']} epochs of masked-language modelling on "
          f"{summary['texts']:,} texts; dev masked-token accuracy {summary['dev_masked_accuracy']:.3f})")
    return "pretrained"


# ---------------------------------------------------------------- layers, weights, export and loading


def find_layer(model: tf.keras.Model, name: str):
    """The model's layer called `name`, or None (get_layer raises instead)."""
    return next((layer for layer in model.layers if layer.name == name), None)


def encoder_layer_names(model: tf.keras.Model) -> list[str]:
    """Names of the layers with encoder weights (embedding, blocks, final norm), in model order."""
    return [l.name for l in model.layers
            if l.name == "embedding" or l.name.startswith("encoder_") or l.name == "final_norm"]


def copy_encoder_weights(source: tf.keras.Model, target: tf.keras.Model):
    """Set every encoder layer of `target` to the weights of `source`'s layer of the same name; a
    PipelineError when the two encoders differ in layers or shapes (a different model config)."""
    names = encoder_layer_names(target)
    if names != encoder_layer_names(source):
        raise PipelineError(f"the pretrained encoder has layers {encoder_layer_names(source)}, the model "
                            f"{names}: model.num_layers differs; run `make pretrain` again")
    for name in names:
        src, dst = source.get_layer(name).get_weights(), target.get_layer(name).get_weights()
        if [w.shape for w in src] != [w.shape for w in dst]:
            raise PipelineError(f"the pretrained encoder's layer {name} has weight shapes "
                                f"{[w.shape for w in src]}, the model {[w.shape for w in dst]}: a different "
                                "model config or vocabulary; run `make pretrain` again")
        target.get_layer(name).set_weights(src)


def serving_function(model: tf.keras.Model, seq_len: int, batch_size: int = 1):
    """A concrete function of `model` with fixed int32 [batch_size, seq_len] inputs named like the
    model inputs (for tf.lite.TFLiteConverter.from_concrete_functions([fn], model))."""
    specs = {name: tf.TensorSpec([batch_size, seq_len], tf.int32, name=name) for name in INPUT_NAMES}

    @tf.function
    def serve(inputs):
        return model(inputs, training=False)

    return serve.get_concrete_function(specs)


def load_model(path, compile: bool = False) -> tf.keras.Model:
    """Load a `.keras` file (safe_mode=True) or a SavedModel directory saved from a model of this
    module. QAT models and unstripped pruned models load too (TFMOT scopes are opened)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: model not found")
    if path.is_file() and path.suffix != ".keras":
        raise PipelineError(f"{path}: expected a .keras file or a SavedModel directory")
    if path.is_dir() and not (path / "saved_model.pb").exists():
        raise PipelineError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(qat_scope())
        stack.enter_context(tfmot.sparsity.keras.prune_scope())
        if path.is_file():
            return tf.keras.models.load_model(path, compile=compile, safe_mode=True)
        return tf.keras.models.load_model(path, compile=compile)
