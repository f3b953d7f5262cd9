"""Which task a data directory is for: a classifier (labelled rows) or a causal language model (plain text)."""
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.text.read import FORMATS

LM_SPLITS = ("train", "dev", "test")  # train.txt and dev.txt; test.txt when there is one


def resolve_task(task, data_dir) -> str:
    """data.task, with auto resolved: "lm" for a directory with train.txt and no labelled train file."""
    if task != "auto":
        return task
    d = Path(data_dir)
    labelled = any((d / f"train{ext}").is_file() for ext in FORMATS)
    return "lm" if (d / "train.txt").is_file() and not labelled else "classify"


def lm_files(data_dir) -> dict[str, Path]:
    """{split: path} of a language-modelling directory; a PipelineError without train.txt or dev.txt."""
    d = Path(data_dir)
    if not d.is_dir():
        raise PipelineError(f"{d}: data directory not found")
    found = {s: d / f"{s}.txt" for s in LM_SPLITS if (d / f"{s}.txt").is_file()}
    for needed in ("train", "dev"):
        if needed not in found:
            raise PipelineError(f"{d / f'{needed}.txt'}: not found (a language-model run needs train.txt and dev.txt)")
    return found
