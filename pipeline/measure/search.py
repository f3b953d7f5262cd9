"""The hyperparameter search's library (the search stage runs the trials): the Optuna study in a SQLite file, the
space's choices as config overrides, early stopping of clearly worse trials, the Pareto front of dev macro F1
against the int8 file's cost, the chosen trial, and the front as a table, a plot and a report section."""
import copy
import html
import json
import statistics
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.core.errors import PipelineError
from pipeline.measure.compare import pareto_front
from pipeline.measure.plots import save_figure
from pipeline.measure.tables import html_table, markdown_table

STUDY = "search"  # the study's name inside study.db
COST = {"latency": ("int8_p50_ms", "int8 p50 ms (1 thread)"), "size": ("int8_bytes", "int8 bytes")}
STARTUP_TRIALS = 4  # random trials before TPE models the space (Optuna's default, 10, is most of a short search)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


# ---------------------------------------------------------------- the space


def encode_choice(value):
    """A choice as Optuna stores it: numbers and strings as they are, lists and dicts as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decode_choice(value):
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def suggest(trial, space):
    """{section.key: value} of one trial, each sampled from the space's choices."""
    return {key: decode_choice(trial.suggest_categorical(key, [encode_choice(c) for c in choices]))
            for key, choices in space.items()}


def config_params(cfg, space):
    """The config's own values of the space's keys, encoded as Optuna params (trial 0: the config as it is)."""
    return {key: encode_choice(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])) for key in space}


def with_overrides(cfg, overrides):
    """A copy of `cfg` with {section.key: value} set (values come from search.space, checked when loaded)."""
    out = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        setattr(getattr(out, section), key, copy.deepcopy(value))
    return out


# ---------------------------------------------------------------- the study


def open_study(path, objective, seed, base, space):
    """The study in SQLite file `path` (created, or loaded to resume), maximising dev macro F1 and minimising the
    cost. `base`: the config the trials vary (without search.*); a study made from another config, objective or
    space is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{Path(path).resolve()}", study_name=STUDY, load_if_exists=True,
                                directions=["maximize", "minimize"])
    # seeded by the trials so far too: a resumed search must not draw the values it drew before
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=STARTUP_TRIALS)
    made = {"base": base, "objective": objective, "space": space}
    for key, value in made.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    if any(study.user_attrs[k] != v for k, v in made.items()):
        raise PipelineError(f"{path}: the study was made from another config, search.objective or search.space; delete "
                            f"{Path(path).parent} to start a new search, or run it with the config it was made from")
    return study


def retry_interrupted(study):
    """Trials a kill left RUNNING become FAIL (marked interrupted) and their params are queued again; returns
    their numbers. Only one search may run on a study at a time."""
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        requeue(study, t)
        numbers.append(t.number)
    return numbers


def requeue(study, trial):
    """Queue `trial`'s params again (keeping whether it is the config's own trial)."""
    study.enqueue_trial(trial.params, user_attrs={"default": bool(trial.user_attrs.get("default")),
                                                  "retry_of": trial.number}, skip_if_exists=False)


def origin(trial):
    """Where a trial's values come from, for its progress line."""
    what = "the config itself" if trial.user_attrs.get("default") else "sampled"
    retry = trial.user_attrs.get("retry_of")
    return what if retry is None else f"{what}, trial {retry} again"


def finished(study):
    """Trials that count toward search.trials: complete, pruned, or failed for a reason other than a kill."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if not t.user_attrs.get("interrupted")]


def stop_early(curve, finished_curves, warmup, margin):
    """The median rule on dev accuracy per epoch: True when, at the latest epoch (1-based) past `warmup`, the
    trial is more than `margin` below the median of at least two finished trials' values at that epoch."""
    epoch = len(curve)
    if epoch <= warmup:
        return False
    others = [c[epoch - 1] for c in finished_curves if len(c) >= epoch]
    return len(others) >= 2 and curve[-1] < statistics.median(others) - margin


# ---------------------------------------------------------------- the front and the chosen trial


def trial_rows(trials, objective):
    """One row per complete trial (not those that drew another's values again): number, whether it is the
    config's own, params, dev scores and costs."""
    key = COST[objective][0]
    rows = []
    for t in trials:
        if t.state != optuna.trial.TrialState.COMPLETE or "same_as" in t.user_attrs:
            continue
        m = t.user_attrs["metrics"]
        rows.append({"trial": t.number, "default": bool(t.user_attrs.get("default")), "macro_f1": t.values[0],
                     "cost": t.values[1], "cost_key": key, **m,
                     "params": {k: decode_choice(v) for k, v in t.params.items()}})
    return rows


def mark_front(rows):
    """Rows with "pareto": True for those no other row beats on both macro F1 and cost."""
    front = set(pareto_front([(r["cost"], r["macro_f1"]) for r in rows]))
    return [{**r, "pareto": i in front} for i, r in enumerate(rows)]


def choose(rows, tolerance=0.0):
    """The chosen trial's row: the best dev macro F1 among the trials at a cost no higher than the config's own
    trial's times 1 + `tolerance` (a latency's noise); without that trial, the best macro F1 on the front."""
    default = next((r for r in rows if r["default"]), None)
    if default is None:
        return max((r for r in rows if r["pareto"]), key=lambda r: (r["macro_f1"], -r["cost"]), default=None)
    cheap = [r for r in rows if r["cost"] <= default["cost"] * (1 + tolerance)]
    return max(cheap, key=lambda r: (r["macro_f1"], -r["cost"]))


def same_values(study, trial):
    """A complete trial of `study` with the same values as `trial` (TPE draws a point again), else None."""
    return next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.params == trial.params and t.number != trial.number and "same_as" not in t.user_attrs), None)


# ---------------------------------------------------------------- the table, the plot, the report section


def pareto_table(rows, objective):
    """The Pareto trials (and the config's own), best macro F1 first, as rows of strings, header first."""
    keys = sorted({k for r in rows for k in r["params"]})
    table = [["trial", "dev macro F1 (int8)", "dev accuracy (int8)", "p50 ms (1 thread)", "int8 bytes", "note",
              *keys]]
    for r in sorted((r for r in rows if r["pareto"] or r["default"]), key=lambda r: -r["macro_f1"]):
        note = ", ".join(n for n, on in (("chosen", r.get("chosen")), ("config's own", r["default"]),
                                         ("Pareto", r["pareto"])) if on)
        table.append([str(r["trial"]), f"{r['macro_f1']:.4f}", f"{r['int8_accuracy']:.4f}",
                      f"{r['int8_p50_ms']:.3f}", f"{r['int8_bytes']:,}", note,
                      *(short(r["params"].get(k)) for k in keys)])
    return table


def short(value):
    return f"[{len(value)} ops]" if isinstance(value, list) else str(value)


def plot_front(rows, label, path):
    """Dev macro F1 against the cost of every complete trial, the front joined, the chosen trial and the
    config's own marked."""
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([r["cost"] for r in rows], [r["macro_f1"] for r in rows], color="tab:blue", label="trials")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["cost"])
    ax.plot([r["cost"] for r in front], [r["macro_f1"] for r in front], "o--", color="tab:red", label="Pareto front")
    for r in rows:
        if r["default"] or r.get("chosen"):
            text = f"trial {r['trial']}" + (" (the config's own)" if r["default"] else "")
            ax.annotate(text + (", chosen" if r.get("chosen") else ""), (r["cost"], r["macro_f1"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("dev macro F1 (int8 .tflite)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)


def report_section(model_dir):
    """(Markdown lines, HTML) of the search's Pareto front for the report, or ([], "") without a search."""
    path = Path(model_dir) / "search" / "pareto.json"
    if not path.is_file():
        return [], ""
    result = json.loads(path.read_text())
    table = pareto_table(result["trials"], result["objective"])
    lines = ["## Hyperparameter search (make search)", "", result["summary"], "", markdown_table(table), "",
             "![search Pareto front](search/pareto.png)", ""]
    page = (f"<h2>Hyperparameter search (make search)</h2><p>{html.escape(result['summary'])}</p>"
            f"{html_table(table)}<img src='search/pareto.png' alt='search Pareto front'>")
    return lines, page
