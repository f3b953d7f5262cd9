"""Generate (`python -m pipeline generate`): continue a prompt with a language model, a model directory or a
.tflite file (its prefill and decode signatures through LiteRT). The sampling is in pipeline/lm/generate.py."""
import sys

from pipeline.core.errors import PipelineError
from pipeline.lm.runs import generate_text, is_lm


def run_generate(model_path, prompt, max_tokens=200, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None):
    """Print the prompt and its continuation on stdout, and the time to first token and the decode speed on
    stderr; return generate()'s result."""
    if not is_lm(model_path):
        raise PipelineError(f"{model_path}: not a language model (no tokenizer.json with it)")
    out = generate_text(model_path, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, stop=stop)
    print(prompt + out["text"], flush=True)
    print(f"generated {out['tokens']} tokens: prefill {1000 * out['prefill_seconds']:.1f} ms, "
          f"decode {out['decode_tokens_per_second']:.1f} tokens/s", file=sys.stderr, flush=True)
    return out
