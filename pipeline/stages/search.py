"""Search stage (`make search`): an Optuna study over the model's shape, learning rate, dropout and the int8
recipe's knobs (search.space), maximising dev macro F1 of the exported int8 file and minimising its cost (p50
latency at 1 thread through LiteRT, or its size: search.objective). Each trial is the train and compress stages
run on the trial's config file in a child process; on a backbone run, whose teacher stays, it is the compress
stage distilling and exporting the trial's student (search.student_space). The study lives in
saved_models/<run>/search/study.db, so a killed search resumes. Writes pareto.json, pareto.md, pareto.png and
best.yaml there; HParams in runs/<run>/search."""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pipeline.core import files, manifest
from pipeline.core.config import check_space_holds, save_config
from pipeline.core.errors import PipelineError
from pipeline.export.student import EPOCH_LOG, teacher_labels
from pipeline.measure import search
from pipeline.measure.latency import fresh_process
from pipeline.measure.tables import markdown_table
from pipeline.model.build import load_model
from pipeline.model.training import read_epoch_log
from pipeline.text.processed import load_processed
from pipeline.text.read import read_examples
from pipeline.text.tokenizer import encode, make_tokenizer

# each trial's compress stage builds only these: float32 is its parity check's reference, int8 is measured
TRIAL_VARIANTS = {"float32": ["float32"], "int8": ["int8"]}
STUDENT_TRIAL_VARIANTS = {"float32": ["float32"], "int8": ["student", "int8"]}  # a backbone run's: its student's
TEACHER_FILES = manifest.MODEL_FILES + ("metrics.json", "config.yaml")  # what a trial's compress stage reads
POLL_SECONDS = 1.0  # how often a running trial's epoch log is read


def run_search_stage(cfg, run):
    """`python -m pipeline search`: run trials until search.trials are finished or search.timeout would pass,
    then write the Pareto front and the chosen trial's config."""
    started = time.time()
    check_search_config(cfg, run)
    space = searched_space(cfg)
    out = Path(cfg.paths.models) / run / "search"
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("search", "paths")}
    study = search.open_study(out / "study.db", cfg.search.objective, cfg.search.seed, base, space)
    retried = search.retry_interrupted(study)
    if retried:
        print(f"search: interrupted trials run again: {', '.join(map(str, retried))}")
    if searches_student(cfg):
        label_transfer_set(cfg, run)
    log_hparams_config(cfg, run, space)
    if not study.trials:
        study.enqueue_trial(search.config_params(cfg, space), user_attrs={"default": True})
    while len(search.finished(study)) < cfg.search.trials:
        if not time_for_a_trial(study, started, cfg.search.timeout):
            print(f"search: stopping, another trial would not finish within search.timeout {cfg.search.timeout} s")
            break
        run_trial(cfg, run, study, out, started + cfg.search.timeout, space)
        write_results(cfg, run, study, out)
    result = write_results(cfg, run, study, out)
    print(result["summary"])
    print(markdown_table(search.pareto_table(result["trials"], cfg.search.objective)))
    return result


def searches_student(cfg):
    """True for a backbone run: its trials distil students of the run's trained model, which stays."""
    return cfg.model.backbone != "none"


def space_name(cfg):
    """The search.* key of the space the trials vary: student_space on a backbone run, else space."""
    return "student_space" if searches_student(cfg) else "space"


def searched_space(cfg):
    return getattr(cfg.search, space_name(cfg))


def check_search_config(cfg, run):
    """A one-line error for what the search cannot run: a space without the config's own values, no processed
    data, a backbone run without its trained model."""
    if cfg.search.trials < 1 or cfg.search.timeout < 1:
        raise PipelineError(f"search.trials and search.timeout must be at least 1, got {cfg.search.trials} and "
                            f"{cfg.search.timeout}")
    if cfg.search.latency_tolerance < 0:
        raise PipelineError(f"search.latency_tolerance must be at least 0, got {cfg.search.latency_tolerance}")
    check_space_holds(cfg, "search", space_name(cfg))
    load_processed(cfg, run)
    model_dir = Path(cfg.paths.models) / run
    if searches_student(cfg) and not (model_dir / "metrics.json").is_file():
        raise PipelineError(f"{model_dir}: no trained model for run '{run}'; a backbone run's search distils students "
                            f"of it: run `make train` first")


def label_transfer_set(cfg, run):
    """The teacher's labels of the transfer set, made once in saved_models/<run>/distill_state/ (skipped when there)
    and linked into every trial, as `make compress` would make them."""
    model_dir = Path(cfg.paths.models) / run
    processed, stats, labels = load_processed(cfg, run)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    teacher_labels(cfg, model_dir, processed, stats, labels, lambda: load_model(model_dir / "model.keras"))


def link_teacher(model_dir, trial_model_dir):
    """A trial's run directory holding the run's teacher and its labelled transfer set as hard links (no copies of
    100s of MB; the stages write by renaming new files into place, so the run's files stay as they are) and a
    manifest that lists only them."""
    names = TEACHER_FILES + tuple(f"distill_state/{p.name}" for p in (model_dir / "distill_state").iterdir()
                                  if p.is_file() and p.name != Path(EPOCH_LOG).name)
    for name in names:
        target = trial_model_dir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(model_dir / name, target)
    m = manifest.load(model_dir)
    files.write_json(trial_model_dir / manifest.NAME, {
        "stages": {"train": m["stages"]["train"]},
        "artifacts": {n: a for n, a in m["artifacts"].items() if n in TEACHER_FILES}})


def time_for_a_trial(study, started, timeout):
    """True while the median duration of the finished trials (none yet: any time) fits before the deadline."""
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in search.finished(study)
            if t.datetime_complete and t.datetime_start]
    return time.time() + (statistics.median(took) if took else 0) < started + timeout


# ---------------------------------------------------------------- one trial


def run_trial(cfg, run, study, out, deadline, space):
    """Ask for a trial, train and compress its config in child processes (a backbone run: compress, which distils
    the trial's student), measure its int8 file, tell the study."""
    trial = study.ask()
    overrides = search.suggest(trial, space)
    print(f"search: trial {trial.number} ({search.origin(trial)}): "
          + ", ".join(f"{k}={search.short(v)}" for k, v in overrides.items()), flush=True)
    earlier = search.same_values(study, trial)
    if earlier is not None:  # TPE drew a config again: its result is told again, nothing is rerun
        trial.set_user_attr("same_as", earlier.number)
        trial.set_user_attr("metrics", earlier.user_attrs["metrics"])
        study.tell(trial, earlier.values)
        print(f"search: trial {trial.number} has the values of trial {earlier.number}: its result, not run again")
        log_hparams(cfg, run, study.trials[trial.number])
        return
    trial_dir = out / f"trial_{trial.number}"
    config = trial_config(cfg, overrides, trial_dir)
    t0 = time.time()
    if searches_student(cfg):
        link_teacher(Path(cfg.paths.models) / run, trial_dir / run)
        stopper = early_stopper(cfg, study, trial, trial_dir / run / EPOCH_LOG, deadline)
        outcome = run_cli(["compress", "--config", str(config), "--run", run], trial_dir / "compress.log", stopper)
    else:
        stopper = early_stopper(cfg, study, trial, trial_dir / run / "train_state" / "epochs.csv", deadline)
        outcome = run_cli(["train", "--config", str(config), "--run", run], trial_dir / "train.log", stopper)
        if outcome == 0:
            outcome = run_cli(["compress", "--config", str(config), "--run", run], trial_dir / "compress.log",
                              lambda: "timeout" if time.time() > deadline else None)
    if outcome == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        print(f"search: trial {trial.number} stopped early at epoch {len(stopper.curve)} (dev accuracy "
              f"{stopper.curve[-1]:.4f}, clearly below the median of the finished trials)")
    elif outcome == "timeout":
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        search.requeue(study, study.trials[trial.number])
        print(f"search: trial {trial.number} stopped at search.timeout; it runs again when the search resumes")
    elif outcome != 0:
        error = last_error(trial_dir, outcome)
        trial.set_user_attr("error", error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"search: trial {trial.number} failed: {error}")
    else:
        metrics = measure_trial(cfg, run, trial_dir, stopper.curve)
        if searches_student(cfg):  # the teacher's export, its parity check's reference: 95 MB a trial for MiniLM
            (trial_dir / run / "tflite" / "float32.tflite").unlink(missing_ok=True)
        trial.set_user_attr("metrics", metrics)
        cost = metrics[search.COST[cfg.search.objective][0]]
        study.tell(trial, [metrics["int8_macro_f1"], cost])
        print(f"search: trial {trial.number} done in {time.time() - t0:.0f} s: int8 dev macro F1 "
              f"{metrics['int8_macro_f1']:.4f}, p50 {metrics['int8_p50_ms']:.3f} ms, {metrics['int8_bytes']:,} bytes")
    log_hparams(cfg, run, study.trials[trial.number])


def trial_config(cfg, overrides, trial_dir):
    """trial_dir/config.yaml: the config with the trial's values; its models and TensorBoard logs in trial_dir."""
    trial_cfg = search.with_overrides(cfg, overrides)
    trial_cfg.paths.models = str(trial_dir)
    trial_cfg.paths.runs = str(trial_dir / "runs")
    variants = STUDENT_TRIAL_VARIANTS if searches_student(cfg) else TRIAL_VARIANTS
    trial_cfg.compress.variants = {k: list(v) for k, v in variants.items()}
    save_config(trial_cfg, trial_dir / "config.yaml")
    return trial_dir / "config.yaml"


def early_stopper(cfg, study, trial, curve_file, deadline):
    """A poll function for the training child: "pruned" when its dev accuracy per epoch (the Keras epoch log) is
    clearly below the finished trials' (search.stop_early's median rule), "timeout" past the deadline. Its `curve`
    holds the epochs seen, also kept as a trial user attribute."""
    finished_curves = [t.user_attrs["metrics"]["val_accuracy"] for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]

    def poll():
        if time.time() > deadline:
            return "timeout"
        try:
            rows = [r for r in read_epoch_log(curve_file) if "val_accuracy" in r]
        except ValueError:  # a line the child is writing right now: read it at the next poll
            rows = []
        if len(rows) > len(poll.curve):
            poll.curve = [float(r["val_accuracy"]) for r in rows]
            trial.set_user_attr("val_accuracy", poll.curve)
            if not trial.user_attrs.get("default") and search.stop_early(
                    poll.curve, finished_curves, cfg.search.prune_warmup, cfg.search.prune_margin):
                return "pruned"
        return None

    poll.curve = []
    return poll


def run_cli(args, log, poll):
    """`python -m pipeline ARGS` in a child process, output to `log`: its exit code, or what `poll` returned
    when it stopped the child. A search killed by a signal takes its child with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        child = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"})
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` ends the child
        try:
            while child.poll() is None:
                reason = poll()
                if reason:
                    child.kill()
                    child.wait()
                    return reason
                time.sleep(POLL_SECONDS)
            return child.returncode
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            signal.signal(signal.SIGTERM, previous)


def last_error(trial_dir, code):
    """The last `error:` line of the trial's logs, else its exit code."""
    for name in ("compress.log", "train.log"):
        path = trial_dir / name
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.startswith("error:")] \
            if path.is_file() else []
        if lines:
            return lines[-1]
    return f"exit code {code} (see {trial_dir}/*.log)"


def measure_trial(cfg, run, trial_dir, curve):
    """The trial's int8 file: dev scores (from its compression.json), size, and p50 latency at 1 thread on 64 dev
    texts in a fresh LiteRT process (pipeline/measure/latency.py); the Keras model's dev scores (a backbone run:
    the student's); the epoch curve."""
    model_dir = trial_dir / run
    keras_dir = model_dir / "distilled" if searches_student(cfg) else model_dir
    compression = files_json(model_dir / "compression.json")
    int8 = compression["variants"]["int8"]
    processed, stats, _ = load_processed(cfg, run)
    texts, _ = read_examples(processed / "dev.jsonl", cfg.data)
    inputs = encode(make_tokenizer(model_dir / "vocab.txt"), texts[:64], int(stats["seq_len"]))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "inputs.npz", **inputs)
        latency = fresh_process("tflite", model_dir / "tflite" / "int8.tflite", Path(tmp) / "inputs.npz")
    history, keras_metrics = files_json(keras_dir / "history.json"), files_json(keras_dir / "metrics.json")
    return {"int8_macro_f1": int8["macro_f1"], "int8_accuracy": int8["accuracy"], "int8_bytes": int8["bytes"],
            "int8_p50_ms": latency["latency"]["threads_1"]["p50_ms"],
            "keras_macro_f1": keras_metrics["dev"]["macro_f1"], "params": keras_metrics["params"],
            "val_accuracy": [float(r["val_accuracy"]) for r in history] or curve}


def files_json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- results


def write_results(cfg, run, study, out):
    """pareto.json, pareto.md, pareto.png and best.yaml (the chosen trial's full config) in `out`."""
    rows = search.mark_front(search.trial_rows(study.trials, cfg.search.objective))
    chosen = search.choose(rows, cfg.search.latency_tolerance if cfg.search.objective == "latency" else 0.0)
    rows = [{**r, "chosen": chosen is not None and r["trial"] == chosen["trial"]} for r in rows]
    states = [t.state.name for t in search.finished(study)]
    stage = "compress" if searches_student(cfg) else "train"  # what remakes the chosen trial's model
    result = {"run": run, "objective": cfg.search.objective, "summary": summary(rows, chosen, states, out, stage),
              "finished": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
              "failed": states.count("FAIL"), "chosen": chosen and chosen["trial"], "trials": rows}
    files.write_json(out / "pareto.json", result)
    files.write_text(out / "pareto.md", f"# Search {run}\n\n{result['summary']}\n\n"
                     + markdown_table(search.pareto_table(rows, cfg.search.objective)) + "\n")
    if rows:
        search.plot_front(rows, search.COST[cfg.search.objective][1], out / "pareto.png")
    if chosen is not None:
        save_config(search.with_overrides(cfg, chosen["params"]), out / "best.yaml")
    # listed in the run's manifest: `make report`, which shows the front, verifies what it reads
    manifest.record(out.parent, "search", {"config": {"search": cfg.to_dict()["search"]}, "inputs": {}},
                    [f"search/{n}" for n in ("pareto.json", "pareto.md", "pareto.png", "best.yaml")
                     if (out / n).is_file()])
    return result


def summary(rows, chosen, states, out, stage):
    """One paragraph: trials finished, the chosen one against the config's own."""
    text = (f"{len(states)} trials finished: {states.count('COMPLETE')} complete, {states.count('PRUNED')} stopped "
            f"early, {states.count('FAIL')} failed; {sum(r['pareto'] for r in rows)} on the Pareto front.")
    if chosen is None:
        return text + " No trial completed yet."
    default = next((r for r in rows if r["default"]), None)
    versus = (f" (the config's own, trial {default['trial']}: {default['macro_f1']:.4f} at "
              f"{default['int8_p50_ms']:.3f} ms, {default['int8_bytes']:,} bytes)") if default else ""
    return (text + f" Chosen: trial {chosen['trial']}, int8 dev macro F1 {chosen['macro_f1']:.4f} at p50 "
            f"{chosen['int8_p50_ms']:.3f} ms (1 thread), {chosen['int8_bytes']:,} bytes{versus}; its config: "
            f"{out / 'best.yaml'} (`make {stage} CONFIG={out / 'best.yaml'}`).")


RESULTS = ("int8_macro_f1", "int8_accuracy", "int8_p50_ms", "int8_bytes", "keras_macro_f1")


def log_hparams_config(cfg, run, space):
    """The HParams dashboard's columns: the space's keys and the trial results."""
    with tf.summary.create_file_writer(str(Path(cfg.paths.runs) / run / "search")).as_default():
        hp.hparams_config(hparams=[hp.HParam(k) for k in space],
                          metrics=[hp.Metric(f"search/{m}") for m in RESULTS])


def log_hparams(cfg, run, trial):
    """The trial's values and results as TensorBoard HParams in runs/<run>/search/trial_<n>."""
    root = Path(cfg.paths.runs) / run / "search"
    metrics = trial.user_attrs.get("metrics", {})
    with tf.summary.create_file_writer(str(root / f"trial_{trial.number}")).as_default():
        hp.hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in trial.params.items()},
                   trial_id=f"trial_{trial.number}")
        tf.summary.text("search/state", trial.state.name, step=0)
        for name in RESULTS:
            if name in metrics:
                tf.summary.scalar(f"search/{name}", metrics[name], step=0)
        for epoch, value in enumerate(trial.user_attrs.get("val_accuracy", [])):
            tf.summary.scalar("search/val_accuracy", value, step=epoch)
