"""Low-rank factorisation: EncoderBlock kernels W [d_in, d_out] replaced by U [d_in, r] · V [r, d_out],
with r from a truncated SVD (the share of squared singular values kept, or a fixed rank)."""
import numpy as np
import tensorflow as tf

from pipeline.model.encoder import EncoderBlock
from pipeline.model.layers import PACKAGE


@tf.keras.utils.register_keras_serializable(package=PACKAGE)
class LowRankEncoderBlock(EncoderBlock):
    """EncoderBlock whose kernels named in `ranks` ({"q": 24, ...}) are products of two factors, `<name>_u`
    and `<name>_v`: two FULLY_CONNECTED ops in TFLite, each pruned and quantized like a kernel."""

    def __init__(self, ranks=None, **kwargs):
        super().__init__(**kwargs)
        self.ranks = {k: int(v) for k, v in (ranks or {}).items()}

    def add_weight(self, name=None, shape=None, *args, **kwargs):
        base = name[:-len("_kernel")] if name and name.endswith("_kernel") else None
        if base not in self.ranks:
            return super().add_weight(name, shape, *args, **kwargs)
        r = self.ranks[base]  # EncoderBlock.build's `<base>_kernel` becomes two factors (and None)
        setattr(self, f"{base}_u", super().add_weight(f"{base}_u", (shape[0], r), *args, **kwargs))
        setattr(self, f"{base}_v", super().add_weight(f"{base}_v", (r, shape[1]), *args, **kwargs))
        return None

    def _kernels(self):
        out = []
        for name in super()._kernels():
            base = name[:-len("_kernel")]
            out += [f"{base}_u", f"{base}_v"] if base in self.ranks else [name]
        return tuple(out)

    def _dense(self, x2d, name):
        if name not in self.ranks:
            return super()._dense(x2d, name)
        return tf.matmul(tf.matmul(x2d, self._weight(f"{name}_u")), self._weight(f"{name}_v")) + self._weight(f"{name}_bias")

    def get_config(self):
        return {**super().get_config(), "ranks": dict(self.ranks)}


def choose_rank(singular_values, energy, fixed_rank=0):
    """Fewest singular values keeping `energy` of sum(s^2) (or `fixed_rank`), capped at the full rank."""
    if fixed_rank > 0:
        return min(int(fixed_rank), len(singular_values))
    share = np.cumsum(np.square(singular_values)) / max(float(np.sum(np.square(singular_values))), 1e-30)
    return int(min(np.searchsorted(share, energy - 1e-12) + 1, len(singular_values)))


def factorise(model, energy, fixed_rank=0):
    """A copy of `model` with every EncoderBlock kernel factorised where the rank r cuts FLOPs
    (r < d_in·d_out / (d_in + d_out)); the others stay whole. Returns (model, {"block/kernel": [r, full]})."""
    plans, ranks = {}, {}
    for layer in model.layers:
        if type(layer) is not EncoderBlock:
            continue
        plans[layer.name] = {}
        for name in layer._kernels():
            w = getattr(layer, name).numpy()
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            r = choose_rank(s, energy, fixed_rank)
            if r * (w.shape[0] + w.shape[1]) < w.shape[0] * w.shape[1]:
                base = name[:-len("_kernel")]
                root = np.sqrt(s[:r])
                plans[layer.name][base] = (u[:, :r] * root, root[:, None] * vt[:r])
            ranks[f"{layer.name}/{name}"] = [r if name[:-len('_kernel')] in plans[layer.name] else None, min(w.shape)]

    def clone(layer):
        if layer.name in plans:
            config = {**layer.get_config(), "ranks": {b: f[0].shape[1] for b, f in plans[layer.name].items()}}
            return LowRankEncoderBlock.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    copy = tf.keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        if old.name not in plans:
            new.set_weights(old.get_weights())
            continue
        for var in new.weights:
            short = var.name.split("/")[-1].split(":")[0]
            base, _, part = short.rpartition("_")
            if base in plans[old.name] and part in ("u", "v"):
                var.assign(plans[old.name][base][part == "v"].astype(np.float32))
            else:
                var.assign(getattr(old, short))
    return copy, ranks
