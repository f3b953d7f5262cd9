"""Training on several machines (train.strategy multi_worker): two worker processes on 127.0.0.1 train one model,
resume it after a kill, the chief alone writes the run, and the model matches a single process's (same global batch)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, cli, sets, tiny_overrides

# full batches only (400 rows, global batch 16, no length buckets): each worker computes 8 rows of every step
MULTI = ["train.strategy=multi_worker", "train.bucketing=false", "train.epochs=6", "train.patience=10"]


def free_ports(n):
    """n ports on 127.0.0.1 that nothing listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(overrides, tmp, n=2, others=()):
    """n `python -m pipeline train` processes, worker i with its TF_CONFIG and TMPDIR tmp; worker 0 is the chief,
    the others get the overrides `others` too."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}  # new ports: a killed run's may linger
    procs = []
    for i in range(n):
        env = {**os.environ, "TMPDIR": str(tmp),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        mine = sets(overrides + (list(others) if i else []))
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--run", "toy", *mine],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=400):
    """[(exit code, stdout, stderr)] of each process; kills them all when one takes longer than timeout."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def kill_after_first_backup(procs, backup, timeout=400):
    """SIGKILL every worker once the chief has backed up an epoch (the cluster restarts as a whole)."""
    deadline = time.monotonic() + timeout
    while not (backup / "chief" / "checkpoint").is_file():
        assert all(p.poll() is None for p in procs), "a worker ended before the first backup"
        assert time.monotonic() < deadline, "no backup in time"
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "training ended before the kill"
    for p in procs:
        p.kill()
        p.communicate()


def dev_probabilities(model_dir, texts):
    from pipeline.measure.predictors import load_predictor

    return load_predictor(model_dir).predict_proba(texts)


@pytest.mark.e2e
def test_two_workers_killed_and_restarted_train_the_model_one_process_would(toy_data, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert cli("data", "--data", str(toy_data), "--run", "toy", *sets(tiny_overrides(multi)),
               timeout=300).returncode == 0
    shutil.copytree(multi / "data", single / "data")  # the same processed data (its manifest is relative)
    model_dir = multi / "saved_models" / "toy"

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    kill_after_first_backup(start_workers(tiny_overrides(multi, *MULTI), tmp), model_dir / "train_state" / "backup")
    left_by_the_kill = sorted(tmp.glob("liteformer-worker*"))  # the killed worker's temporary directory

    # A worker that cannot see the chief's backup (another machine, no shared filesystem) would restore nothing.
    apart = finish(start_workers(tiny_overrides(multi, *MULTI), tmp, others=[f"paths.models={tmp_path}/elsewhere"]))
    for code, _, stderr in apart:
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr[-3000:]
        assert "train_state/backup: only 1 of 2 workers see it" in stderr
    results = finish(start_workers(tiny_overrides(multi, *MULTI), tmp))
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"worker {i}: {stderr[-3000:]}"
        assert "resuming the interrupted run" in stdout, f"worker {i}: {stdout}"
    assert "worker 1: trained with the chief" in results[1][1]
    assert "trained toy: dev accuracy" in results[0][1]

    # The chief wrote the run; the other worker nothing (its temporary copies are gone).
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert (model_dir / "model.keras").is_file() and metrics["dev"]["accuracy"] > 0.9
    assert not [p for p in multi.rglob("*") if "workertemp" in p.name]
    assert sorted(tmp.glob("liteformer-worker*")) == left_by_the_kill
    assert not (model_dir / "train_state" / "backup").exists()  # deleted once training finished

    # One process with the same global batch, never killed, takes the same steps on the same batches.
    code = cli("train", "--run", "toy", *sets(tiny_overrides(single, *MULTI[1:])), timeout=300).returncode
    assert code == 0
    expected = json.loads((single / "saved_models" / "toy" / "metrics.json").read_text())
    history = json.loads((model_dir / "history.json").read_text())
    assert [int(r["epoch"]) for r in history] == list(range(6))
    assert [r["loss"] for r in history] == pytest.approx(
        [r["loss"] for r in json.loads((single / "saved_models" / "toy" / "history.json").read_text())], abs=1e-4)
    assert metrics["dev"]["accuracy"] == pytest.approx(expected["dev"]["accuracy"], abs=0.02)
    texts = [json.loads(line)["text"] for line in (multi / "data" / "processed" / "toy" / "dev.jsonl")
             .read_text().splitlines()]
    np.testing.assert_allclose(dev_probabilities(model_dir, texts),
                               dev_probabilities(single / "saved_models" / "toy", texts), atol=1e-3)


def test_a_malformed_tf_config_is_a_one_line_error(toy_data, tmp_path):
    env = {**os.environ, "TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", '
                                      '"index": 3}}'}
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--run", "toy",
                          *sets(tiny_overrides(tmp_path, "train.strategy=multi_worker"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: TF_CONFIG: task worker 3 is not in the cluster")
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "saved_models").exists()
