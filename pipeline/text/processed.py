"""A processed run, data/processed/<run>/ (what the data stage writes): its directory, stats and labels."""
import json
from pathlib import Path

from pipeline.core import manifest
from pipeline.core.errors import PipelineError

# Bump when the data stage's outputs or the way it reads files change, so older runs are rebuilt.
STAGE_VERSION = 5  # 2: train.jsonl; header rows and columns recognised by content. 3: word vectors. 4: their learned-vocabulary size. 5: train_encoder_mean_len


def processed_dir(cfg, run) -> Path:
    """data/processed/<run> under paths.data."""
    return Path(cfg.paths.data) / "processed" / run


def load_labels(directory) -> list[str]:
    """Labels of a processed run (or any directory with labels.txt); id = line index."""
    path = Path(directory) / "labels.txt"
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    labels = [s for s in path.read_text(encoding="utf-8").split("\n") if s]
    if not labels:
        raise PipelineError(f"{path}: empty")
    return labels


def load_stats(directory) -> dict:
    """stats.json of a processed run."""
    path = Path(directory) / "stats.json"
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run the data stage first)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_processed(cfg, run):
    """(directory, stats, labels) of data/processed/<run>, or a PipelineError saying to run the data stage."""
    processed = processed_dir(cfg, run)
    stats_path = processed / "stats.json"
    if not stats_path.exists():
        raise PipelineError(f"{processed}: no processed data for run '{run}'; run `python -m pipeline data` first")
    made_by = manifest.stage_version(processed, "data")
    if made_by != STAGE_VERSION:
        raise PipelineError(f"{processed}: made by an older data stage (version {made_by}, now {STAGE_VERSION}); run "
                            f"`python -m pipeline data --run {run}` again")
    return processed, json.loads(stats_path.read_text()), load_labels(processed)
