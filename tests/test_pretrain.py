"""Pretraining stage: BERT masking statistics, unlabelled text, the encoder handed to training, manifests."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, ROOT, make_toy_dir, tiny_overrides
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

PRETRAIN = ["pretrain.epochs=2", "pretrain.batch_size=32"]


def write_unlabeled(path, n, seed=0):
    rng = random.Random(seed)
    words = FILLER + POSITIVE + NEGATIVE + ["zebra", "quokka"]  # two words only the unlabelled text has
    path.write_text("".join(" ".join(rng.choices(words, k=rng.randint(4, 12))) + "\n" for _ in range(n)))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """(config, processed dir, model dir, summary) after data (with unlabeled.txt) and pretrain on the toy task."""
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.pretrain import run_pretrain_stage

    root = tmp_path_factory.mktemp("pretrain")
    data = make_toy_dir(root)
    write_unlabeled(data / "unlabeled.txt", 300)
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(root, *PRETRAIN))
    run_data_stage(cfg, str(data), "toy")
    summary = run_pretrain_stage(cfg, "toy")
    return cfg, root / "data" / "processed" / "toy", root / "saved_models" / "toy", summary


def test_masking_follows_bert_statistics(pretrained_run):
    from pipeline.text.dataset import make_mlm_dataset
    from pipeline.text.tokenizer import load_vocabulary

    _, processed, _, _ = pretrained_run
    vocab = load_vocabulary(processed / "vocab.txt")
    special = [vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
    path = processed / "unlabeled.tfrecord"
    plain = make_mlm_dataset([path], 16, 64, vocab, 0.15, training=False)
    selectable = masked = as_mask = kept = 0
    for _ in range(20):  # masks are drawn anew on every pass
        for x, target in plain.as_numpy_iterator():
            ids = x["input_word_ids"]
            rows = np.arange(len(ids))[:, None].repeat(target.shape[1], 1)
            used = target >= 0
            pos = x["mask_positions"]
            at = ids[rows[used], pos[used]]
            original = target[used]
            # the unmasked text: masked positions get their target back
            restored = ids.copy()
            restored[rows[used], pos[used]] = original
            assert not np.isin(original, special).any()  # [PAD], [CLS], [SEP] are never selected
            assert (x["input_mask"] == (restored != 0)).all()
            per_row = (~np.isin(restored, special)).sum(1)
            # BERT's rule as tf_text applies it: ceil(15%) of each text's selectable wordpieces
            np.testing.assert_array_equal(used.sum(1), np.ceil(0.15 * per_row))
            selectable += int(per_row.sum())
            masked += int(used.sum())
            as_mask += int((at == vocab.index("[MASK]")).sum())
            kept += int((at == original).sum())
    assert 0.15 <= masked / selectable < 0.3  # short texts round up
    assert as_mask / masked == pytest.approx(0.8, abs=0.02)
    random_other = (masked - as_mask - kept) / masked  # a random token (it may be the original by chance)
    assert kept / masked == pytest.approx(0.1 + 0.1 / len(vocab), abs=0.02)
    assert random_other == pytest.approx(0.1 - 0.1 / len(vocab), abs=0.02)


def test_pretrain_writes_encoder_that_learned_and_uses_unlabelled_text(pretrained_run):
    cfg, processed, model_dir, summary = pretrained_run
    vocab = (processed / "vocab.txt").read_text().split("\n")
    assert "zebra" in vocab and "quokka" in vocab  # the vocabulary is learned from unlabelled text too
    assert summary["unlabeled_texts"] == 300 and summary["texts"] == 300 + 400 - 0  # toy train has 400 rows
    history = json.loads((model_dir / "pretrained" / "history.json").read_text())
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    for key in ("masked_accuracy", "perplexity", "val_masked_accuracy", "val_perplexity"):
        assert key in history[0]
    assert (Path(cfg.paths.runs) / "toy" / "pretrain").is_dir()  # TensorBoard logs


def test_pretrain_is_skipped_when_up_to_date(pretrained_run, capsys):
    from pipeline.stages.pretrain import run_pretrain_stage

    cfg, _, model_dir, summary = pretrained_run
    before = (model_dir / "manifest.json").read_text()
    assert run_pretrain_stage(cfg, "toy") == summary
    assert "pretrain: up to date" in capsys.readouterr().out
    assert (model_dir / "manifest.json").read_text() == before


def test_training_starts_from_the_pretrained_encoder(pretrained_run):
    import tensorflow as tf

    from pipeline.model.build import build_model, encoder_layer_names, load_model
    from pipeline.model.build import initialize_encoder
    from pipeline.model.training import train_key as stage_key

    cfg, processed, model_dir, _ = pretrained_run
    source = load_model(model_dir / "pretrained" / "model.keras")
    model = build_model(cfg.model, len((processed / "vocab.txt").read_text().split()), 2, 16)
    assert initialize_encoder(cfg, model, model_dir) == "pretrained"
    for name in encoder_layer_names(model):
        for a, b in zip(model.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert "pretrain/pretrained" in stage_key(cfg, processed, model_dir)["inputs"]  # retrained when it changes

    scratch = load_config(ROOT / "params.yaml", tiny_overrides(Path(cfg.paths.models).parent, *PRETRAIN,
                                                                "train.init=scratch"))
    assert initialize_encoder(scratch, build_model(cfg.model, 76, 2, 16), model_dir) == "scratch"
    assert "pretrain/pretrained" not in stage_key(scratch, processed, model_dir)["inputs"]

    deeper = load_config(ROOT / "params.yaml", tiny_overrides(Path(cfg.paths.models).parent, "model.num_layers=2"))
    other = build_model(deeper.model, len((processed / "vocab.txt").read_text().split()), 2, 16)
    with pytest.raises(PipelineError, match="num_layers differs; run `make pretrain` again"):
        initialize_encoder(deeper, other, model_dir)
    tf.keras.backend.clear_session()


def test_train_stage_records_its_init(pretrained_run):
    from pipeline.stages.train import run_train_stage

    cfg, _, _, _ = pretrained_run
    assert run_train_stage(cfg, "toy")["init"] == "pretrained"


def test_bad_mask_rate_is_one_line_error(pretrained_run):
    from pipeline.stages.pretrain import run_pretrain_stage

    cfg, _, _, _ = pretrained_run
    bad = load_config(ROOT / "params.yaml", tiny_overrides(Path(cfg.paths.models).parent, "pretrain.mask_rate=1.5"))
    with pytest.raises(PipelineError, match="pretrain.mask_rate must be in"):
        run_pretrain_stage(bad, "toy")
