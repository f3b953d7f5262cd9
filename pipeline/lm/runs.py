"""A trained language model as the stages find it: a model directory (model.keras, tokenizer.json, config.json,
as the train stage writes it) or an exported .tflite file with tokenizer.json beside it or one directory up
(saved_models/<run>/tflite/*.tflite); scoring a text file and generating with either."""
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.lm.generate import generate
from pipeline.lm.measure import score_keras, score_tflite
from pipeline.lm.tokenizer import load_tokenizer
from pipeline.lm.windows import read_text

TOKENIZER = "tokenizer.json"


def tokenizer_path(path) -> Path | None:
    """tokenizer.json of a language model directory or .tflite file, or None (not a language model)."""
    path = Path(path)
    places = [path] if path.is_dir() else [path.parent, path.parent.parent]
    return next((d / TOKENIZER for d in places if (d / TOKENIZER).is_file()), None)


def is_lm(path) -> bool:
    return tokenizer_path(path) is not None


def open_lm(path):
    """(Keras model or None, a prefill/decode runner, tokenizer) of a model directory or .tflite file."""
    from pipeline.lm.export import CachedLM, LiteRTLM  # TensorFlow's converter module only when a model runs
    from pipeline.lm.model import load_lm  # TensorFlow only when a model runs
    path = Path(path)
    tokenizer = load_tokenizer(tokenizer_path(path))
    if path.is_dir():
        model = load_lm(path / "model.keras")
        return model, CachedLM(model), tokenizer
    try:
        return None, LiteRTLM(path), tokenizer
    except ValueError as e:
        raise PipelineError(str(e)) from None


def read_lm_text(path) -> str:
    """A text file to score; a one-line PipelineError naming it when it is missing or empty."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: not found")
    try:
        return read_text(path)
    except ValueError as e:
        raise PipelineError(str(e)) from None


def score_file(model_path, data_path) -> dict:
    """Cross-entropy per token, perplexity, bits per character and next-token accuracy of a text file."""
    text = read_lm_text(data_path)
    model, runner, tokenizer = open_lm(model_path)
    if len(tokenizer.encode(text)) < 2:
        raise PipelineError(f"{data_path}: too short to score (needs at least 2 characters)")
    if model is not None:
        return score_keras(model, tokenizer, text, runner.context)
    return score_tflite(model_path, tokenizer, text)


def generate_text(model_path, prompt, **sampling) -> dict:
    """generate() from a model directory or .tflite file; bad sampling settings are a PipelineError."""
    _, runner, tokenizer = open_lm(model_path)
    try:
        return generate(runner, tokenizer, prompt, **sampling)
    except ValueError as e:
        raise PipelineError(str(e)) from None
