"""The command line in everyday use: the remembered run, a quiet stderr, `make help`."""
import subprocess

import pytest
from conftest import ROOT, cli, make_toy_dir, sets, tiny_overrides

from pipeline.__main__ import build_parser, main, remember_run, resolve_run
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError


def test_run_is_given_else_named_by_data_else_remembered_else_sst2(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    parse = build_parser().parse_args
    assert resolve_run(parse(["compress"]), cfg)[0] == "SST-2"
    assert resolve_run(parse(["data", "--data", str(tmp_path / "mydata")]), cfg)[0] == "mydata"

    remember_run(cfg, "mydata")
    assert (tmp_path / "saved_models" / ".current_run").read_text() == "mydata\n"
    for argv in (["compress"], ["benchmark"], ["report"], ["train"], ["data"],
                 ["evaluate", "--data", str(tmp_path / "other.tsv")]):  # evaluate's --data is a file, not a run
        run, origin = resolve_run(parse(argv), cfg)
        assert run == "mydata" and origin.startswith("remembered"), argv
    assert resolve_run(parse(["report", "--run", "other"]), cfg)[0] == "other"
    assert resolve_run(parse(["data", "--data", str(tmp_path / "new")]), cfg)[0] == "new"

    (tmp_path / "saved_models" / ".current_run").write_text("../elsewhere\n")
    with pytest.raises(PipelineError, match=r"\.current_run:1: not a run name"):
        resolve_run(parse(["train"]), cfg)


def test_stages_without_run_use_the_run_of_the_last_data_stage(tmp_path, capsys):
    overrides = sets(tiny_overrides(tmp_path))
    toy = make_toy_dir(tmp_path)
    assert main(["data", "--data", str(toy), *overrides]) == 0
    assert "run: toy (the name of --data's directory)" in capsys.readouterr().out

    # Without --data, the data stage reads the directory the run was made from: no SST-2 download.
    assert main(["data", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run: toy (remembered") and "data: up to date" in out
    assert not (tmp_path / "data" / "raw").exists()

    # A data stage that fails on bad input changes nothing, the remembered run included.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\n")
    assert main(["data", "--data", str(bad), *overrides]) == 2
    assert (tmp_path / "saved_models" / ".current_run").read_text() == "toy\n"
    capsys.readouterr()

    assert main(["compress", *overrides]) == 2  # the remembered run, not yet trained
    out, err = capsys.readouterr()
    assert out.startswith("run: toy (remembered") and "no trained model for run 'toy'" in err


def test_train_without_run_trains_the_remembered_run_and_prints_only_its_own_lines(tmp_path, capsys):
    overrides = sets(tiny_overrides(tmp_path))
    assert main(["data", "--data", str(make_toy_dir(tmp_path)), *overrides]) == 0
    capsys.readouterr()
    done = cli("train", *overrides, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("run: toy (remembered from the last data/train given DATA or RUN")
    assert "trained toy" in done.stdout and (tmp_path / "saved_models" / "toy" / "metrics.json").is_file()
    assert done.stderr == ""  # no TensorFlow start-up lines, no library warnings


def test_a_bad_input_prints_one_error_line_and_nothing_else(tmp_path):
    done = cli("evaluate", "--model", str(tmp_path / "nonexistent"), "--data", str(tmp_path / "x.tsv"), timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "nonexistent" in done.stderr, done.stderr
    assert done.stdout == ""


def test_make_help_lists_targets_and_variables():
    done = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    for word in ("data", "train", "evaluate", "compress", "benchmark", "report", "test", "clean",
                 "DATA=", "RUN=", "SET=", "CONFIG="):
        assert word in done.stdout, word
    assert len(done.stdout.splitlines()) <= 8
