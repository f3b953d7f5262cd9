"""The privacy a DP-SGD run spends: ε at δ of Poisson-subsampled Gaussian steps (dp-accounting's RDP accountant),
the noise multiplier that meets a target ε, and the record metrics.json, the report and the model card show."""
import dp_accounting
from dp_accounting import rdp

# What ε covers and what it does not: every other use of the train split is outside the guarantee.
COVERS = {"all": "the Transformer's weights, trained by DP-SGD on the train split (each train row one record)",
          "head": "the classifier head's weights, trained by DP-SGD on the train split (each train row one record) "
                  "over the pretrained backbone's features; the backbone is the public checkpoint, unchanged"}
NOT_COVERED = [
    "the vocabulary when learned from the train texts (model.backbone none; a backbone's vocabulary is public)",
    "the sequence length (data.length_percentile of the train lengths) and the class weights (train class counts)",
    "the number of train rows n (sets the sampling rate and δ)",
    "the bag-of-words baseline (fitted on train without privacy; a comparison, not shipped)",
    "make distill / make compress: their training on train (distilled, pruned, QAT, clustered variants) and the "
    "int8 variants' calibration ranges (compress.calibration_samples train sentences) are not private",
]
# .tflite recipes that only post-process the private weights (DP holds under post-processing)
COVERED_RECIPES = (["float32"], ["dynamic_range"], ["float16"])
ACCOUNTING = ("RDP accountant (dp-accounting) of Poisson-subsampled Gaussian steps at sampling rate batch_size / n; "
              "the input pipeline shuffles each epoch and takes fixed-size batches, the usual approximation")


def dp_sgd_event(noise_multiplier, sampling_rate, steps):
    """The DpEvent of `steps` DP-SGD steps: each a Gaussian mechanism on a Poisson sample of the data."""
    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def epsilon(noise_multiplier, sampling_rate, steps, delta):
    """ε at `delta` after `steps` DP-SGD steps (inf with no noise)."""
    if noise_multiplier <= 0:
        return float("inf")
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_sgd_event(noise_multiplier, sampling_rate, steps))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon, sampling_rate, steps, delta):
    """The smallest noise multiplier (to 1e-4) whose ε at `delta` after `steps` steps is at most target_epsilon."""
    noise = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, lambda z: dp_sgd_event(z, sampling_rate, steps), target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=1e-4)
    while epsilon(noise, sampling_rate, steps, delta) > target_epsilon:  # Brent's method may land just below
        noise += 1e-4
    return float(noise)


def privacy_record(t, train_rows, noise_multiplier, steps):
    """metrics.json's "privacy": the DP-SGD settings, the steps taken, ε at δ = 1/n, and what ε covers."""
    q, delta = t.batch_size / train_rows, 1.0 / train_rows
    return {
        "epsilon": epsilon(noise_multiplier, q, steps, delta),
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "target_epsilon": t.privacy_target_epsilon or None,
        "l2_norm_clip": t.privacy_l2_norm_clip,
        "microbatches": t.privacy_microbatches or t.batch_size,
        "steps": int(steps),
        "sampling_rate": q,
        "train_rows": int(train_rows),
        "accounting": ACCOUNTING,
        "trained": t.privacy_train,
        "covers": COVERS[t.privacy_train],
        "not_covered": NOT_COVERED,
    }


def privacy_line(record):
    """One line: ε, δ and the DP-SGD settings behind them."""
    return (f"differential privacy: ε = {record['epsilon']:.2f} at δ = {record['delta']:.2e} (1/n, n = "
            f"{record['train_rows']:,}) after {record['steps']:,} DP-SGD steps, noise multiplier "
            f"{record['noise_multiplier']:.4f}, clip {record['l2_norm_clip']:g}, sampling rate "
            f"{record['sampling_rate']:.2e}, {record['microbatches']} microbatches a batch")


def privacy_fact(record):
    """The report's bullet: ε and what it covers ([] for a run trained without privacy)."""
    if not record:
        return []
    return [f"{privacy_line(record)}. ε covers {record['covers']}; not covered: {'; '.join(record['not_covered'])}."]


def privacy_markdown(record, recipe=None):
    """A short Markdown section for the model card: ε, whether the variant (its recipe) is covered, what is not."""
    if not record:
        return ""
    covered = "" if recipe is None else (
        " This file's variant only post-processes those weights: ε holds for it." if recipe in COVERED_RECIPES else
        f" This file's variant ({' + '.join(recipe)}) used train data again without privacy: ε does NOT hold for it.")
    lines = ["", "## Differential privacy", "", privacy_line(record) + ".", "",
             f"ε covers {record['covers']}.{covered} Not covered:", ""]
    return "\n".join(lines + [f"- {item}" for item in record["not_covered"]]) + "\n"
