"""Recipes: clustering, the QAT family, 2:4 sparsity, entropy coding and the bounded search."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import coding
from shrinkfleet.config import ClusterConfig, PruneConfig, QatConfig, parse_params
from shrinkfleet.evaluation import TFLiteModel, accuracy_of, kernel_sparsity, tflite_sparsity
from tests.conftest import TINY_PARAMS


@pytest.fixture(scope="module")
def pruned(student, digits):
    from tasks.prune import prune

    return prune(student, PruneConfig(target_sparsity=0.7, epochs=3, frequency=5), digits, seed=0)


@pytest.mark.parametrize("k", [4, 16])
def test_clustered_kernels_hold_at_most_k_values_and_keep_sparsity(pruned, digits, k):
    from shrinkfleet.techniques import cluster, distinct_values

    clustered = cluster(pruned, ClusterConfig(clusters=k, epochs=1), digits, seed=0)
    # k centroids, plus the zero that sparsity-preserving clustering keeps apart
    assert all(n <= k + 1 for n in distinct_values(clustered).values())
    assert kernel_sparsity(clustered) == pytest.approx(kernel_sparsity(pruned), abs=0.005)
    assert not any(np.signbit(w[w == 0]).any() for w in clustered.get_weights())  # no -0.0 left


def test_pqat_keeps_the_sparsity_of_the_pruned_model(pruned, digits):
    from shrinkfleet.evaluation import to_tflite
    from shrinkfleet.techniques import quantization_aware

    qat = quantization_aware(pruned, "pqat", QatConfig(epochs=1), digits, seed=0)
    content = to_tflite(qat, "int8", digits.train.x[:50])
    assert tflite_sparsity(TFLiteModel(content)) == pytest.approx(kernel_sparsity(pruned), abs=0.01)
    assert accuracy_of(TFLiteModel(content).predict, digits.test.x, digits.test.y) > 0.5


def test_pcqat_keeps_clusters_per_channel_and_sparsity(pruned, digits):
    from shrinkfleet.evaluation import to_tflite
    from shrinkfleet.techniques import cluster, quantization_aware

    clustered = cluster(pruned, ClusterConfig(clusters=8, epochs=1), digits, seed=0)
    model = quantization_aware(clustered, "pcqat", QatConfig(epochs=1), digits, seed=0)
    tfl = TFLiteModel(to_tflite(model, "int8", digits.train.x[:50]))
    assert tflite_sparsity(tfl) == pytest.approx(kernel_sparsity(pruned), abs=0.01)
    for w in tfl.weight_tensors():  # per output channel: at most 8 centroids + zero
        assert max(len(np.unique(row)) for row in w.reshape(w.shape[0], -1)) <= 9
    assert accuracy_of(tfl.predict, digits.test.x, digits.test.y) > 0.5


def test_two_of_four_structured_sparsity(student, digits):
    from tasks.prune import expected_sparsity, prune

    cfg = PruneConfig(pattern="2:4", epochs=2, frequency=5)
    model = prune(student, cfg, digits, seed=0)
    assert expected_sparsity(cfg) == 0.5
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            k = layer.kernel.numpy()  # (inputs, outputs): groups of 4 consecutive inputs
            groups = k[: k.shape[0] // 4 * 4].reshape(-1, 4, k.shape[1])
            assert ((groups == 0).sum(axis=1) >= 2).all(), layer.name


def _resolved(**overrides):
    params = __import__("copy").deepcopy(TINY_PARAMS)
    params.update(overrides)
    return parse_params(params).resolve("digits-mlp")


def test_every_recipe_writes_an_exact_coded_variant(teacher, student, pruned, digits):
    from tasks.compress import compress

    cfg = _resolved(cluster={"clusters": 8, "epochs": 1}, qat={"epochs": 1})
    variants, not_applicable = compress(cfg, {"teacher": teacher, "student": student, "pruned": pruned}, digits)
    assert not_applicable == {}
    assert set(variants) == set(cfg.recipes)
    for name, v in variants.items():
        assert coding.decode(v.coded) == v.content, name
    clustered = variants["pruned-clustered"]
    assert clustered.steps == ["cluster(8)", "float32"] and clustered.parent == "pruned"
    assert len(clustered.coded) < len(variants["pruned-float32"].coded)


def test_search_respects_the_budget_and_the_bound(teacher, student, digits):
    from tasks.compress import search, search_order

    cfg = _resolved(search={"enabled": True, "budget": 2, "max_accuracy_drop": 1.0, "sparsities": [0.5, 0.9],
                            "clusters": [4, 16], "conversions": ["float32"]},
                    cluster={"epochs": 1}, prune={**TINY_PARAMS["prune"], "epochs": 1})
    order = search_order(cfg)
    assert order[0][:2] == (0.9, 4)  # the smallest expected candidate first
    trials = search(cfg, teacher, student, digits)
    assert 1 <= len(trials) <= 2
    best = [t for t in trials.values() if t.search["best"]]
    assert len(best) == 1 and best[0].search["within_bound"]
    # an impossible bound uses the whole budget and marks nothing best
    strict = _resolved(search={**cfg.search.model_dump(), "max_accuracy_drop": 0.0, "budget": 2},
                       cluster={"epochs": 1}, prune={**TINY_PARAMS["prune"], "epochs": 1})
    trials = search(strict, teacher, student, digits)
    assert len(trials) == 2 and not any(t.search["best"] for t in trials.values())
