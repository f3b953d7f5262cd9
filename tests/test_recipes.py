"""Compression recipes on a tiny model: the recipe list validated, low-rank factorisation, weight
clustering (and cluster-preserving QAT), int8 with float32 islands counted in XNNPACK partitions."""
import numpy as np
import pytest

SEQ = 16


def _tiny(seed=0, conv_width=5):
    import tensorflow as tf

    from pipeline.core.config import ModelConfig
    from pipeline.model.build import build_model

    tf.keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(d_model=32, num_layers=1, num_heads=2, ff_dim=64, dropout=0.0,
                                   conv_width=conv_width, ngram_order=0), 1000, 2, SEQ)


def _inputs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(SEQ) < rng.integers(4, SEQ + 1, size=(n, 1))).astype(np.int32)  # padded, as texts are
    ids = rng.integers(1, 1000, size=(n, SEQ)).astype(np.int32) * mask
    return {"input_word_ids": ids, "input_mask": mask, "input_type_ids": np.zeros_like(ids)}


def _data(n=32):
    import tensorflow as tf

    x = _inputs(n)
    y = tf.one_hot(x["input_word_ids"][:, 0] % 2, 2)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def _representative():
    x = _inputs()
    return lambda: ({k: v[i:i + 1] for k, v in x.items()} for i in range(8))


@pytest.mark.parametrize("variants, message", [
    ("{float32: [float32], x: [prune, int4]}", "compress.variants.x: unknown step 'int4' (steps: student, prune"),
    ("{float32: [float32], x: [int8, prune]}", "compress.variants.x: 'int8' at position 1; a recipe ends with"),
    ("{float32: [float32], x: [prune]}", "compress.variants.x: 'prune' at position 1; a recipe ends with"),
    ("{float32: [float32], x: [prune, student, int8]}", "compress.variants.x: 'student' can only be the first"),
    ("{int8: [int8]}", "compress.variants needs float32: [float32]"),
    ("{float32: [float32], x: []}", "compress.variants.x: expected a non-empty list of steps"),
])
def test_recipe_list_is_validated_with_a_one_line_error(variants, message):
    from pipeline.core.config import load_config
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=None) as error:
        load_config(None, [f"compress.variants={variants}"])
    assert message in str(error.value) and "\n" not in str(error.value)
    cfg = load_config(None, ["compress.variants={float32: [float32], mine: [lowrank, fine_tune, prune, int8]}"])
    assert cfg.compress.variants["mine"] == ["lowrank", "fine_tune", "prune", "int8"]


def test_report_ship_may_name_a_variant_of_the_recipe_list():
    from pipeline.core.config import load_config
    from pipeline.core.errors import PipelineError

    mine = "compress.variants={float32: [float32], mine: [lowrank, fine_tune, int8]}"
    assert load_config(None, ["report.ship=mine", mine]).report.ship == "mine"  # in either order
    with pytest.raises(PipelineError, match="--set report.ship=pruned_int8: 'report.ship' must be one of smallest, "
                                            "fastest, most_accurate, float32, mine, got 'pruned_int8'"):
        load_config(None, [mine, "report.ship=pruned_int8"])  # not in this recipe list


def test_choose_rank_keeps_the_energy_asked_for():
    from pipeline.model.lowrank import choose_rank

    s = np.array([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert choose_rank(s, 0.7) == 1 and choose_rank(s, 0.9) == 2 and choose_rank(s, 0.95) == 3
    assert choose_rank(s, 1.0) == 4 and choose_rank(s, 0.5, fixed_rank=3) == 3 and choose_rank(s, 0.5, 9) == 4


def test_lowrank_reduces_rank_and_flops_and_saves(tmp_path):
    from pipeline.measure.flops import matmul_flops
    from pipeline.export.convert import export_tflite
    from pipeline.model.lowrank import factorise, LowRankEncoderBlock
    from pipeline.model.build import load_model

    model = _tiny()
    low, ranks = factorise(model, energy=0.5, fixed_rank=4)
    block = low.get_layer("encoder_0")
    assert isinstance(block, LowRankEncoderBlock)
    assert set(block.ranks) == {"conv", "q", "k", "v", "o", "ff1", "ff2"} and set(block.ranks.values()) == {4}
    assert ranks["encoder_0/q_kernel"] == [4, 32]
    product = block.q_u.numpy() @ block.q_v.numpy()
    assert product.shape == (32, 32) and np.linalg.matrix_rank(product) == 4
    assert low.count_params() < model.count_params()
    x = _inputs()
    assert np.allclose(low(x).numpy().sum(1), 1.0, atol=1e-5)
    # the same prediction as the full model when no rank is cut: energy 1 keeps every kernel whole
    whole, kept = factorise(model, energy=1.0)
    assert all(r is None for r, _ in kept.values())
    assert np.allclose(whole(x).numpy(), model(x).numpy(), atol=1e-5)
    low.save(tmp_path / "low.keras")
    again = load_model(tmp_path / "low.keras")
    assert np.allclose(again(x).numpy(), low(x).numpy(), atol=1e-6)
    flops = []
    for i, m in enumerate((model, low)):
        (tmp_path / f"{i}.tflite").write_bytes(export_tflite(m, SEQ, "float32"))
        flops.append(matmul_flops(tmp_path / f"{i}.tflite"))
    assert flops[1] < 0.5 * flops[0]
    assert all(type(f) is int for f in flops)  # written to benchmark.json


@pytest.mark.e2e  # two short fine-tunings: ~20 s on an idle 2-core machine
@pytest.mark.parametrize("pruned", [False, True])
def test_clustering_leaves_at_most_k_values_per_kernel_through_cluster_preserving_qat(tmp_path, pruned):
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.export.convert import export_tflite
    from pipeline.export.recipes import cluster_model, kernel_sparsity, qat_model, unique_values
    from pipeline.core.config import load_config

    cfg = load_config(None, ["compress.clusters=4", "compress.learning_rate=0.001", "train.batch_size=8"])
    model = _tiny()
    if pruned:  # as after the prune step: 80% zeros, which clustering and its QAT keep
        rng = np.random.default_rng(0)
        model.set_weights([np.where(rng.random(w.shape) < 0.8, 0.0, w).astype(w.dtype) if w.ndim == 2 else w
                           for w in model.get_weights()])
    clustered = cluster_model(model, cfg, _data(), 4, tmp_path / "logs")
    values = unique_values(clustered)
    assert {"embedding/embeddings", "encoder_0/q_kernel", "encoder_0/ff2_kernel"} <= set(values)
    assert all(n <= 4 + pruned for n in values.values()), values  # pruned: the zeros besides 4 centroids
    if pruned:
        assert all(s > 0.75 for s in kernel_sparsity(clustered).values())
    qat = qat_model(clustered, cfg, _data(), 4, tmp_path / "logs", preserve_clusters=True, preserve_sparsity=pruned)
    content = export_tflite(qat, SEQ, "int8", _representative(), cfg.compress.float_ops, per_tensor=True)
    interpreter = Interpreter(model_content=content)
    kernels = {}
    for d in interpreter.get_tensor_details():
        if len(d["shape"]) == 2 and d["dtype"] == np.int8 and int(np.prod(d["shape"])) >= 32 * 32:
            try:
                kernels[d["name"]] = np.unique(interpreter.get_tensor(d["index"])).size
            except ValueError:  # an activation, not a constant
                pass
    assert len(kernels) >= 7  # the conv, q, k, v, o, ff1 and ff2 kernels ship in int8 ...
    assert all(n <= 4 + pruned for n in kernels.values()), kernels  # ... with at most 4 distinct values each


def test_float_ops_keep_the_int8_graph_in_one_xnnpack_partition(tmp_path):
    from pipeline.measure.tflite_file import op_placement
    from pipeline.export.convert import export_tflite
    from pipeline.core.config import CompressConfig

    model, rep, float_ops = _tiny(), _representative(), CompressConfig().float_ops
    for name, mode, ops in (("islands", "int8", float_ops), ("full", "int8", []), ("float32", "float32", [])):
        (tmp_path / f"{name}.tflite").write_bytes(export_tflite(model, SEQ, mode, rep, ops))
    islands, full, float32 = (op_placement(tmp_path / f"{n}.tflite") for n in ("islands", "full", "float32"))
    assert full["xnnpack_partitions"] > 3 and "SOFTMAX:int8" in full["builtin_fallback"]
    assert islands["xnnpack_partitions"] == float32["xnnpack_partitions"] == 1
    # on builtin kernels only what float32 leaves there too (int32 mask arithmetic, the embedding GATHER)
    assert {k.split(":")[0] for k in islands["builtin_fallback"]} <= {k.split(":")[0] for k in float32["builtin_fallback"]}
    assert islands["delegated"]["FULLY_CONNECTED:int8"] >= 7 and "SOFTMAX:float32" in islands["delegated"]
    # LayerNorm and the attention mask stay float: in int8 they cost a fine-tuned MiniLM 7 points on SST-2
    assert not {k for k in islands["delegated"] if k.split(":")[0] in ("MEAN", "SUB", "MUL") and not k.endswith("float32")}
    assert {"MEAN:float32", "MUL:float32"} <= set(islands["delegated"])


def test_report_lists_ranks_and_cluster_counts():
    from pipeline.stages.report import step_facts

    compression = {"step_stats": {"prune": {"encoder_0/q_kernel": 0.8},
                                  "lowrank": {"encoder_0/q_kernel": [12, 32], "encoder_0/ff1_kernel": [None, 32]},
                                  "prune+cluster": {"encoder_0/q_kernel": 16}}}
    assert step_facts(compression) == [
        "Low-rank (lowrank): rank of each factorised kernel / its full rank: q 12/32, ff1 whole/32.",
        "Clustering (prune+cluster): distinct values per kernel: q_kernel 16."]
    assert step_facts({}) == []
