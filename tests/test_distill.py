"""Distillation: the KD loss on known values, augmentation, and a tiny end-to-end student through export."""
import dataclasses
import json

import numpy as np
import pytest

from conftest import COMPRESS, ROOT, make_toy_dir, make_vectors_file, tiny_overrides
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

STUDENT = ["distill.student_d_model=8", "distill.student_num_heads=2", "distill.student_ff_dim=16", "distill.student_num_layers=1",
           "distill.epochs=2", "distill.learning_rate=0.005", "distill.augment_copies=2", "distill.batch_size=16"]


def test_distillation_loss_on_known_values():
    from pipeline.model.distillation import distillation_loss

    teacher = np.array([[2.0, 0.0], [0.0, 0.0]], np.float32)
    student = np.array([[0.0, 0.0], [1.0, -1.0]], np.float32)
    gold = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # the second row has no label
    has_gold = np.array([1.0, 0.0], np.float32)
    t, alpha = 2.0, 0.5

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher / t), softmax(student / t)
    kl = (p * np.log(p / q)).sum(-1)
    ce = np.array([-np.log(softmax(student[0])[0]), 0.0])
    expected = np.mean(t * t * kl + alpha * has_gold * ce)
    assert float(distillation_loss(teacher, student, gold, has_gold, t, alpha)) == pytest.approx(expected, rel=1e-5)
    # a student equal to the teacher pays only the gold term, and nothing without labels
    assert float(distillation_loss(teacher, teacher, gold, np.zeros(2, np.float32), t, alpha)) == pytest.approx(0, abs=1e-6)


def test_representation_loss_is_one_minus_cosine_and_standardisation_is_per_dimension():
    from pipeline.model.distillation import representation_loss, vector_standardisation

    teacher = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    student = np.array([[5.0, 0.0], [1.0, 0.0], [-3.0, -4.0]], np.float32)  # same direction, orthogonal, opposite
    assert float(representation_loss(teacher, student)) == pytest.approx((0 + 1 + 2) / 3, rel=1e-6)
    vectors = np.random.default_rng(0).normal([1.0, -50.0], [2.0, 0.1], (100_000, 2)).astype(np.float16)
    mean, std = vector_standardisation(vectors, chunk=7_000)
    np.testing.assert_allclose(mean, vectors.astype(np.float64).mean(0), rtol=1e-4)
    np.testing.assert_allclose(std, vectors.astype(np.float64).std(0), rtol=1e-3)


def test_augment_keeps_cls_sep_and_masks_or_cuts():
    from pipeline.model.distillation import augment

    ids = np.array([2, 10, 11, 12, 13, 14, 15, 3, 0, 0])
    rng = np.random.default_rng(0)
    masked = augment(ids, 8, rng, mask_id=4, mask_prob=0.5, ngram_prob=0.0)
    assert masked[0] == 2 and masked[7] == 3 and (masked[8:] == 0).all()
    body = masked[1:7]
    assert (body == 4).any() and ((body == 4) | (body == ids[1:7])).all()
    cut = augment(ids, 8, rng, mask_id=4, mask_prob=0.0, ngram_prob=1.0)
    n = int((cut != 0).sum()) - 2
    assert 1 <= n <= 5 and cut[0] == 2 and cut[n + 1] == 3 and (cut[n + 2:] == 0).all()
    window = cut[1:n + 1]
    assert any((ids[1 + i:1 + i + n] == window).all() for i in range(6 - n + 1))  # a contiguous window


def test_the_teachers_vectors_shape_the_student_only_when_vector_weight_is_positive(tmp_path):
    import tensorflow as tf

    from pipeline.model.build import build_model
    from pipeline.model.distillation import logits_and_vectors, predict_outputs, train_student

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (64, 10))
    ids[::2, 6:] = 0
    logits, gold = rng.normal(size=(64, 2)).astype(np.float32), np.zeros((64, 2), np.float32)
    teacher_vectors = rng.normal(size=(64, 12)).astype(np.float16)

    def student_vectors(weight, vectors):
        cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "distill.epochs=3", "distill.batch_size=16",
                                                               "train.min_steps=1", "distill.learning_rate=0.01",
                                                               f"distill.vector_weight={weight}"))
        tf.keras.utils.set_random_seed(0)
        student = build_model(cfg.model, 40, 2, 10)
        train_student(cfg, student, (ids, logits, gold, np.zeros(64, np.float32), vectors), (ids[:8], np.zeros(8)),
                      tmp_path / "runs")
        return predict_outputs(logits_and_vectors(student), ids)[1]

    # without the term the teacher's vectors change nothing; with it they do
    np.testing.assert_array_equal(student_vectors(0.0, teacher_vectors), student_vectors(0.0, -teacher_vectors))
    assert np.abs(student_vectors(1.0, teacher_vectors) - student_vectors(1.0, -teacher_vectors)).max() > 1e-3


def test_soft_label_dataset_pads_per_batch_and_targets_the_teachers_probabilities():
    from pipeline.model.distillation import soft_label_dataset

    ids = np.zeros((10, 12), np.int64)
    for i in range(10):
        ids[i, :2 + i] = np.arange(2, 4 + i)
    logits = np.stack([np.arange(10.0), -np.arange(10.0)], axis=1).astype(np.float32)
    seen = []
    for inputs, targets in soft_label_dataset(ids, logits, batch_size=4, seed=0).take(6):
        x = inputs["input_word_ids"].numpy()
        rows = [int(np.flatnonzero((ids[:, :x.shape[1]] == r).all(1) & ((ids != 0).sum(1) == (r != 0).sum()))[0])
                for r in x]
        assert x.shape[1] == max(2 + r for r in rows)  # padded to the batch's longest text only
        assert (inputs["input_mask"].numpy() == (x != 0)).all()
        p = np.exp(logits[rows]) / np.exp(logits[rows]).sum(1, keepdims=True)
        np.testing.assert_allclose(targets.numpy(), p, rtol=1e-5)
        seen += rows
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # whole epochs, endless


def test_projected_embeddings_keep_what_the_teacher_knows_of_each_token():
    """The student's embeddings start as the teacher's principal components: tokens close in the teacher stay
    close, at the student's initial spread."""
    from pipeline.model.distillation import projected_embeddings

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 32))
    table = rng.normal(size=(200, 3)) @ basis + 0.01 * rng.normal(size=(200, 32))  # 3 directions carry it
    table[1] = table[0] + 0.01 * rng.normal(size=32)  # token 1 means what token 0 means
    projected = projected_embeddings(table.astype(np.float32), 8)
    assert projected.shape == (200, 8) and projected.dtype == np.float32
    assert projected.std() == pytest.approx(8 ** -0.5, rel=1e-4)
    distances = np.linalg.norm(projected - projected[0], axis=1)
    assert distances[1] < 0.05 * np.median(distances[2:])
    # the first 3 components hold (nearly) everything; distances between tokens survive the projection
    full = np.linalg.norm(table - table[0], axis=1)
    np.testing.assert_allclose(distances[2:] / distances[2:].mean(), full[2:] / full[2:].mean(), rtol=0.02)
    assert projected_embeddings(table.astype(np.float32), 40)[:, 32:].max() == 0  # wider than the teacher


def test_the_labelling_copy_gives_the_teachers_logits_in_bfloat16(tmp_path):
    import tensorflow as tf

    from pipeline.model.distillation import labelling_copy, predict_logits
    from pipeline.model.build import logits_model
    from pipeline.model.build import build_run_model

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "train.mixed_precision=mixed_bfloat16",
                                                           "model.d_model=32", "model.ff_dim=64"))
    stats = {"rows": {"train": 100}, "seq_len": 12}
    teacher = build_run_model(cfg, stats, 50, 3, None)
    teacher.get_layer("probabilities").kernel.assign(teacher.get_layer("probabilities").kernel * 20)  # logits ~ 1
    copy = labelling_copy(cfg, teacher, stats, 50, 3, None)
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # the process's policy is left as it was
    assert copy.get_layer("encoder_0").compute_dtype == "bfloat16"
    ids = np.random.default_rng(0).integers(5, 50, (64, 12))
    ids[::2, 7:] = 0  # padded texts too
    expected, got = (predict_logits(logits_model(m), ids) for m in (teacher, copy))
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(got, expected, atol=0.03 * np.abs(expected).max())
    assert labelling_copy(load_config(ROOT / "params.yaml", tiny_overrides(tmp_path)), teacher, stats, 50, 3,
                          None) is teacher  # float32: the teacher itself


@pytest.mark.e2e
def test_distill_then_compress_ships_the_student(tmp_path):
    from pipeline.stages.compress import run_compress_stage
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.distill import run_distill_stage
    from pipeline.measure.predictors import load_predictor
    from pipeline.model.build import load_model
    from pipeline.stages.train import run_train_stage

    data = make_toy_dir(tmp_path)
    (data / "unlabeled.txt").write_text("the film was good\nthe plot was dull and weak\n")
    vectors = make_vectors_file(tmp_path / "vectors.txt")
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, "train.epochs=6", *STUDENT, *COMPRESS,
                                                           f"data.word_vectors={vectors}"))
    run_data_stage(cfg, str(data), "toy")
    run_train_stage(cfg, "toy")
    # distill.epochs=2 shows 2 x 1,202 texts, fewer than the 200 training batches of 16 (3,200): a third epoch
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, min_steps=200))
    metrics = run_distill_stage(longer, "toy")

    out = tmp_path / "saved_models" / "toy" / "distilled"
    assert metrics["transfer_texts"] == 3 * 400 + 2  # train, two augmented copies, the unlabelled texts
    assert metrics["epochs"] == 3
    assert metrics["params"] < metrics["teacher_params"] and metrics["flops"] < metrics["teacher_flops"] / 2
    assert metrics["dev"]["accuracy"] > 0.9 and "dev" in metrics["teacher"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    predictor = load_predictor(out)  # a model directory like the teacher's
    assert predictor.predict_proba(["a superb film", "an awful film"]).argmax(1).tolist() == [1, 0]
    # the student has the run's word vectors, and embeddings for the learned vocabulary only (as the teacher)
    student, teacher = (load_model(d / "model.keras").get_layer("embedding") for d in (out, out.parent))
    np.testing.assert_array_equal(student.word_vectors.numpy(), teacher.word_vectors.numpy())
    assert student.embeddings.shape[0] == teacher.embeddings.shape[0] == student.vocab_size - 6

    only_student = {"float32": ["float32"], "distilled_float32": ["student", "float32"],
                    "distilled_int8": ["student", "int8"]}  # the other recipes are tested in test_compress.py
    summary = run_compress_stage(dataclasses.replace(cfg, compress=dataclasses.replace(cfg.compress,
                                                                                       variants=only_student)), "toy")
    for name in ("distilled_float32", "distilled_int8"):
        assert (tmp_path / "saved_models" / "toy" / "tflite" / f"{name}.tflite").is_file()
        assert summary["variants"][name]["accuracy"] > 0.9

    # the transfer set keeps the teacher's pooled vector of every text, at the teacher's width
    cache = out.parent / "distill_state" / "transfer.npz"
    teacher_vectors = np.load(cache.parent / "vectors.npy")
    assert teacher_vectors.shape == (3 * 400 + 2, cfg.model.d_model) and np.abs(teacher_vectors).max() > 0
    # another student shape distils again from the same teacher-labelled transfer set, not labelling it anew
    labelled = cache.stat().st_mtime_ns
    narrower = run_distill_stage(dataclasses.replace(longer, distill=dataclasses.replace(cfg.distill, student_ff_dim=8)),
                                 "toy")
    assert narrower["params"] < metrics["params"] and cache.stat().st_mtime_ns == labelled


def test_distill_needs_a_trained_teacher(toy_data, tmp_path):
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.distill import run_distill_stage

    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, *STUDENT))
    run_data_stage(cfg, str(toy_data), "toy")
    with pytest.raises(PipelineError, match="no trained model"):
        run_distill_stage(cfg, "toy")
