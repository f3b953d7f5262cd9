"""The language model's configuration: one dataclass for the model's shape and its training run."""
import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class LMConfig:
    """Shape of the causal Transformer and the settings of its training run. The defaults are the run measured
    on tinyshakespeare (1M characters) on a 2-core CPU; dropout 0.1 did worse there (README, Language models)."""
    context: int = 128           # tokens a window holds; learned positions exist up to here
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    position: str = "learned"    # or "sinusoidal"
    score_limit: float = 8.0     # attention scores clipped to +-score_limit (keeps int8 ranges small)
    ngram_order: int = 6         # > 0: add a hashed n-gram logit table (model.HashedNgramLogits) of this order
    ngram_buckets: int = 262139  # the most rows a context length gets (kneser_ney.ngram_rows sizes each from train)
    # the rows per context length: set by train_lm from the train text (saved in config.json); []: ngram_buckets
    ngram_rows: list = dataclasses.field(default_factory=list)
    ngram_init: str = "counts"   # "counts": the table is Kneser-Ney log-probabilities, not trained; "zeros": learned
    batch_size: int = 32
    steps: int = 1800
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    mixed_precision: str = "mixed_bfloat16"  # or "float32" (CPUs without bfloat16 units)
    log_every: int = 50          # TensorBoard points every this many steps
    eval_every: int = 300        # dev bits per character on a slice of dev every this many steps
    eval_chars: int = 20000      # the first this many characters (the whole dev file is scored after training;
                                 # tinyshakespeare's first 10k dev characters are easier: 2.03 bpc vs 2.25)
    seed: int = 0

    def save(self, path):
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path):
        """A config saved by save(); unknown keys are an error, missing ones take the defaults."""
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown LM config keys {unknown}")
        return cls(**data)
