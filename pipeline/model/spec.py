"""The run's model from the config alone, without TensorFlow: how many wordpieces the encoder reads, whether the
n-gram term is used (model.*), and the backbone's shape. The data stage reads these; build.py builds from them."""
import dataclasses

from pipeline.core.config import ModelConfig
from pipeline.model import ngram
from pipeline.model.backbone import configured_dir, read_spec


def encoder_length(cfg: ModelConfig, seq_len: int, backbone=None) -> int:
    """Wordpieces of a text the encoder reads (its first ones): seq_len, at most model.max_encoder_len and the
    backbone's positions. The n-gram term reads all seq_len: attention's cost grows with the square of it."""
    return max(1, min(seq_len, cfg.max_encoder_len or seq_len, backbone.max_positions if backbone else seq_len))


def model_config(cfg, stats):
    """model.*, with the n-gram term off when the train split has more than model.ngram_max_rows rows, or with
    train.privacy (its closed-form fit on train is not private)."""
    m = cfg.model
    if not m.ngram_order or (ngram.term_used(m, int(stats["rows"]["train"])) and not cfg.train.privacy):
        return m
    return dataclasses.replace(m, ngram_order=0)


def backbone_spec(cfg):
    """The BackboneSpec of model.backbone, or None."""
    directory = configured_dir(cfg)
    return read_spec(directory) if directory else None
