"""The search stage: the Pareto front, the chosen trial and the early-stopping rule on fixed numbers; the space's
checks; and (e2e) a tiny study on toy data that writes its files, resumes without repeating finished trials,
retries a trial a kill interrupted, and whose best.yaml `train` reproduces; a backbone run's study of students, each
distilled from the run's one labelled transfer set, whose best.yaml `distill` reproduces."""
import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import ROOT, assert_one_line_error, cli, make_toy_dir, run_cli, sets, tiny_overrides

from pipeline.core import manifest
from pipeline.core.config import check_space_holds, load_config
from pipeline.core.errors import PipelineError
from pipeline.measure import search


def row(trial, macro_f1, cost, default=False):
    return {"trial": trial, "default": default, "macro_f1": macro_f1, "cost": cost, "params": {}}


def test_pareto_front_and_chosen_trial_on_fixed_numbers():
    rows = search.mark_front([row(0, 0.60, 1.0, default=True), row(1, 0.65, 0.8), row(2, 0.70, 1.5),
                              row(3, 0.62, 0.5), row(4, 0.55, 0.9)])
    assert [r["trial"] for r in rows if r["pareto"]] == [1, 2, 3]  # 0 and 4 are beaten by trial 1
    assert search.choose(rows)["trial"] == 1  # the best macro F1 at no more than the config's cost
    without_default = [{**r, "default": False} for r in rows]
    assert search.choose(without_default)["trial"] == 2  # the best macro F1 on the front
    best_is_default = search.mark_front([row(0, 0.70, 1.0, default=True), row(1, 0.60, 0.5), row(2, 0.75, 2.0)])
    assert search.choose(best_is_default)["trial"] == 0
    assert search.choose([]) is None
    # a latency's noise: a better trial up to 10% slower than the config's own is chosen, not one 20% slower
    noisy = search.mark_front([row(0, 0.60, 1.00, default=True), row(1, 0.70, 1.08), row(2, 0.75, 1.2)])
    assert search.choose(noisy)["trial"] == 0 and search.choose(noisy, 0.1)["trial"] == 1


def test_a_config_drawn_again_reuses_the_earlier_result():
    space = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({"x": 1})
    first = study.ask(space)
    study.tell(first, [0.5, 1.0])
    for x, earlier in ((2, None), (1, first.number)):
        study.enqueue_trial({"x": x})
        trial = study.ask(space)
        found = search.same_values(study, trial)
        assert (found and found.number) == earlier
        study.tell(trial, [0.4, 1.1])


def test_the_report_section_shows_the_front_only_when_the_run_has_a_search(tmp_path):
    assert search.report_section(tmp_path) == ([], "")
    rows = search.mark_front([row(0, 0.60, 1.0, default=True), row(1, 0.65, 0.8), row(2, 0.55, 0.9)])
    rows = [{**r, "chosen": r["trial"] == 1, "int8_accuracy": 0.7, "int8_p50_ms": r["cost"], "int8_bytes": 1000,
             "params": {"model.d_model": 64, "compress.float_ops": []}} for r in rows]
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "pareto.json").write_text(json.dumps({"objective": "latency", "summary": "S.",
                                                                 "trials": rows}))
    md, page = search.report_section(tmp_path)
    table = [line for line in "\n".join(md).splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trial | dev macro F1 (int8)") and len(table) == 3  # header, trials 1 and 0
    assert table[1].startswith("| 1 | 0.6500 |") and "chosen, Pareto" in table[1] and "[0 ops]" in table[1]
    assert "config's own" in table[2] and "| 2 |" not in "".join(table)  # trial 2: neither on the front nor trial 0
    assert "![search Pareto front](search/pareto.png)" in md and "<table>" in page


def test_a_trial_stops_early_only_when_clearly_below_the_median_after_the_warmup():
    others = [[0.5, 0.6, 0.7, 0.8], [0.5, 0.62, 0.72], [0.4, 0.58, 0.69]]
    assert not search.stop_early([0.1, 0.1], others, warmup=2, margin=0.05)  # still in the warmup
    assert search.stop_early([0.1, 0.1, 0.5], others, warmup=2, margin=0.05)  # 0.5 < median 0.70 - 0.05
    assert not search.stop_early([0.1, 0.1, 0.67], others, warmup=2, margin=0.05)  # within the margin
    assert not search.stop_early([0.1, 0.1, 0.1, 0.1], others, warmup=2, margin=0.05)  # one trial reached epoch 4
    assert not search.stop_early([0.1, 0.1, 0.1], others[:1], warmup=2, margin=0.05)  # one trial is no median


def test_trial_zero_samples_the_configs_own_values_lists_included():
    cfg = load_config(ROOT / "params.yaml", ["model.backbone=none", "train.learning_rate=0.001"])
    check_space_holds(cfg, "search")
    fixed = optuna.trial.FixedTrial(search.config_params(cfg, cfg.search.space))
    overrides = search.suggest(fixed, cfg.search.space)
    assert overrides["compress.float_ops"] == cfg.compress.float_ops and overrides["model.d_model"] == 128
    changed = search.with_overrides(cfg, {"model.d_model": 64, "compress.float_ops": []})
    assert (changed.model.d_model, changed.compress.float_ops, cfg.model.d_model) == (64, [], 128)


def test_the_space_is_checked_when_the_config_is_loaded():
    with pytest.raises(PipelineError, match=r"search.space.model.d_model: expected int, got 'x'"):
        load_config(None, ["search.space={model.d_model: [x]}"])
    with pytest.raises(PipelineError, match=r"search.space.model.nope: unknown key"):
        load_config(None, ["search.space={model.nope: [1]}"])
    with pytest.raises(PipelineError, match=r"search.space.search.trials: expected a section.key"):
        load_config(None, ["search.space={search.trials: [1]}"])
    with pytest.raises(PipelineError, match=r"search.objective.*latency, size"):
        load_config(None, ["search.objective=speed"])
    cfg = load_config(ROOT / "params.yaml", ["model.backbone=none"])  # train.learning_rate 5e-5: not a choice
    with pytest.raises(PipelineError, match=r"search.space.train.learning_rate must include the config's own"):
        check_space_holds(cfg, "search")


def test_a_backbone_search_needs_the_trained_teacher_and_varies_only_the_student(tmp_path, capsys):
    data = make_toy_dir(tmp_path)
    assert cli("data", "--data", str(data), "--run", "toy", *sets(tiny_overrides(tmp_path))).returncode == 0
    code, _, err = run_cli(capsys, "search", "--run", "toy", *sets(tiny_overrides(tmp_path, "model.backbone=all-minilm-l6-v2")))
    assert_one_line_error(code, err, "no trained model", "make train")
    assert not (tmp_path / "saved_models" / "toy" / "search").exists()
    with pytest.raises(PipelineError, match=r"search.student_space.model.d_model: only distill.\* and compress.\* keys"):
        load_config(None, ["search.student_space={model.d_model: [64]}"])


# ---------------------------------------------------------------- a tiny study on toy data

SPACE = "search.space={model.d_model: [16, 32], train.learning_rate: [0.005, 0.01]}"


def search_args(root, trials):
    # search.prune_margin 1: no trial of this study stops early, so each test knows every trial's state
    overrides = tiny_overrides(root, SPACE, f"search.trials={trials}", "search.prune_margin=1.0",
                               "compress.calibration_samples=50")
    return ["search", "--run", "toy", *sets(overrides)]


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """(root, outputs of a search to 2 trials, then resumed to 3) on the toy task."""
    root = tmp_path_factory.mktemp("search")
    data = make_toy_dir(root)
    assert cli("data", "--data", str(data), "--run", "toy", *sets(tiny_overrides(root))).returncode == 0
    first = cli(*search_args(root, 2), timeout=1800)
    second = cli(*search_args(root, 3), timeout=1800)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return root, first.stdout, second.stdout


@pytest.mark.e2e
def test_search_writes_the_study_the_front_and_the_chosen_config(studied):
    root, first, _ = studied
    out = root / "saved_models" / "toy" / "search"
    assert "trial 0 (the config itself)" in first and "trial 1 (sampled)" in first
    result = json.loads((out / "pareto.json").read_text())
    assert (result["finished"], result["complete"], result["objective"]) == (3, 3, "latency")
    # a config TPE draws again (4 in this space) is told the earlier result and left out of the table
    study = optuna.load_study(study_name=search.STUDY, storage=f"sqlite:///{out / 'study.db'}")
    for t in study.trials:
        if "same_as" in t.user_attrs:
            earlier = study.trials[t.user_attrs["same_as"]]
            assert (t.params, t.values) == (earlier.params, earlier.values)
    assert [r["trial"] for r in result["trials"]] == [t.number for t in study.trials if "same_as" not in t.user_attrs]
    assert [r["trial"] for r in result["trials"]][:2] == [0, 1] and result["trials"][0]["default"]
    for r in result["trials"]:
        assert 0 <= r["macro_f1"] <= 1 and r["int8_p50_ms"] > 0 and r["int8_bytes"] > 0
        assert r["cost"] == r["int8_p50_ms"]
        assert (out / f"trial_{r['trial']}" / "toy" / "tflite" / "int8.tflite").is_file()
    assert sum(r["chosen"] for r in result["trials"]) == 1 and any(r["pareto"] for r in result["trials"])
    assert "| trial | dev macro F1 (int8)" in (out / "pareto.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (out / "study.db").is_file()
    for name in ("pareto.json", "pareto.png", "best.yaml"):  # listed for `make report`, which verifies what it reads
        manifest.verify(root / "saved_models" / "toy", f"search/{name}")
    for n in range(3):
        assert list((root / "runs" / "toy" / "search" / f"trial_{n}").glob("events.out.tfevents.*"))


@pytest.mark.e2e
def test_a_resumed_search_runs_only_the_missing_trials(studied):
    root, first, second = studied
    assert "trial 2 " not in first and "trial 0 " not in second and "trial 1 " not in second
    assert "search: trial 2 (sampled)" in second
    study = optuna.load_study(study_name=search.STUDY, storage=f"sqlite:///{root}/saved_models/toy/search/study.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.e2e
def test_best_yaml_loads_and_train_reproduces_the_chosen_trial(studied):
    root, _, _ = studied
    out = root / "saved_models" / "toy" / "search"
    result = json.loads((out / "pareto.json").read_text())
    chosen = next(r for r in result["trials"] if r["chosen"])
    cfg = load_config(out / "best.yaml")
    assert cfg.model.d_model == chosen["params"]["model.d_model"]
    assert cfg.train.learning_rate == chosen["params"]["train.learning_rate"]
    assert yaml.safe_load((out / "best.yaml").read_text())["paths"]["models"] == f"{root}/saved_models"
    done = cli("train", "--config", str(out / "best.yaml"), "--run", "toy", timeout=900)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((root / "saved_models" / "toy" / "metrics.json").read_text())
    assert metrics["dev"]["macro_f1"] == pytest.approx(chosen["keras_macro_f1"], abs=1e-6)


@pytest.mark.e2e
def test_a_killed_search_retries_the_interrupted_trial(studied):
    root, _, _ = studied
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *search_args(root, 4)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = root / "saved_models" / "toy" / "search" / "trial_3" / "train.log"
    for _ in range(600):  # until trial 3's training has started
        if log.is_file() and "training" in log.read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    resumed = cli(*search_args(root, 4), timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    assert "search: interrupted trials run again: 3" in resumed.stdout and "search: trial 4 (sampled, trial 3 again)" in resumed.stdout
    study = optuna.load_study(study_name=search.STUDY, storage=f"sqlite:///{root}/saved_models/toy/search/study.db")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3 + [optuna.trial.TrialState.FAIL,
                                                               optuna.trial.TrialState.COMPLETE]
    assert study.trials[4].params == study.trials[3].params and study.trials[3].user_attrs["interrupted"]


# ---------------------------------------------------------------- a backbone run's study of students


@pytest.fixture(scope="module")
def student_study(tmp_path_factory):
    """(root, overrides, search output) of a 3-trial study of students of a tiny BERT teacher on the toy task."""
    from test_backbone import make_tiny_bert

    root = tmp_path_factory.mktemp("student_search")
    data = make_toy_dir(root)
    bert, _, _ = make_tiny_bert(root / "bert")
    overrides = tiny_overrides(
        root, f"model.backbone={bert}", "train.epochs=4", "train.learning_rate=0.003",
        "distill.student_d_model=8", "distill.student_num_heads=2", "distill.student_ff_dim=16",
        "distill.student_num_layers=1", "distill.epochs=3", "distill.augment_copies=1", "distill.batch_size=32",
        "search.student_space={distill.student_d_model: [8, 16], distill.temperature: [2.0, 4.0]}",
        "search.trials=3", "search.prune_margin=1.0", "compress.calibration_samples=50")
    for stage in ("data", "train"):
        done = cli(stage, *(("--data", str(data)) if stage == "data" else ()), "--run", "toy", *sets(overrides),
                   timeout=900)
        assert done.returncode == 0, done.stderr
    found = cli("search", "--run", "toy", *sets(overrides), timeout=1800)
    assert found.returncode == 0, found.stderr
    return root, overrides, found.stdout


@pytest.mark.e2e
def test_a_backbone_search_distils_a_student_per_trial_from_one_labelled_transfer_set(student_study):
    root, _, stdout = student_study
    run_dir = root / "saved_models" / "toy"
    out = run_dir / "search"
    result = json.loads((out / "pareto.json").read_text())
    assert (result["finished"], result["complete"]) == (3, 3)
    assert "make compress CONFIG=" in result["summary"]
    manifest.verify(run_dir, "search/pareto.json")  # what `make report` reads and verifies
    labelled = (run_dir / "distill_state" / "transfer.npz").stat()
    for r in result["trials"]:
        trial_run = out / f"trial_{r['trial']}" / "toy"
        assert r["params"]["distill.student_d_model"] in (8, 16) and 0 <= r["macro_f1"] <= 1 and r["int8_p50_ms"] > 0
        assert json.loads((trial_run / "compression.json").read_text())["variants"]["int8"]["recipe"] == ["student", "int8"]
        assert not (trial_run / "tflite" / "float32.tflite").exists()  # the teacher's, no copy per trial
        student = yaml.safe_load((trial_run / "distilled" / "config.yaml").read_text())
        assert student["model"]["d_model"] == r["params"]["distill.student_d_model"]  # the trial's student shape
        # the teacher and its labels are the run's own files, linked: nothing trained or labelled again
        assert (trial_run / "model.keras").stat().st_ino == (run_dir / "model.keras").stat().st_ino
        assert (trial_run / "distill_state" / "transfer.npz").stat().st_ino == labelled.st_ino
        assert "transfer set of" not in (out / f"trial_{r['trial']}" / "compress.log").read_text()
        epochs = (trial_run / "distill_state" / "epochs.csv").read_text().splitlines()
        assert epochs[0].startswith("epoch,loss,val_accuracy") and len(epochs) == 1 + len(r["val_accuracy"])
    assert result["trials"][0]["default"] and result["trials"][0]["params"]["distill.student_d_model"] == 8


@pytest.mark.e2e
def test_best_yaml_distils_the_chosen_trials_student_again(student_study):
    root, _, _ = student_study
    out = root / "saved_models" / "toy" / "search"
    chosen = next(r for r in json.loads((out / "pareto.json").read_text())["trials"] if r["chosen"])
    cfg = load_config(out / "best.yaml")
    assert cfg.distill.student_d_model == chosen["params"]["distill.student_d_model"]
    assert cfg.distill.temperature == chosen["params"]["distill.temperature"]
    done = cli("distill", "--config", str(out / "best.yaml"), "--run", "toy", timeout=900)
    assert done.returncode == 0, done.stderr
    student = json.loads((root / "saved_models" / "toy" / "distilled" / "metrics.json").read_text())
    assert student["dev"]["macro_f1"] == pytest.approx(chosen["keras_macro_f1"], abs=1e-6)
