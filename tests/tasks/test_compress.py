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
    measured = kernel_sparsity(model)
    assert measured >= 0.5 - 1e-6 and measured == pytest.approx(expected_sparsity(cfg, model), abs=0.01)
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


def _check_search(trials, bound, budget, teacher_val, digits):
    """Every trial's recorded figures are what its flatbuffer measures; the first within the bound is
    the best and the search stops there; with none within, the whole budget is spent."""
    infos = [t.search for t in trials.values()]
    assert [i["trial"] for i in infos] == list(range(1, len(infos) + 1))
    for t in trials.values():
        val = accuracy_of(TFLiteModel(t.content).predict, digits.val.x, digits.val.y)
        assert t.search["val_accuracy"] == pytest.approx(val)
        assert t.search["val_drop"] == pytest.approx(teacher_val - val)
        assert t.search["within_bound"] == (t.search["val_drop"] <= bound)
    within = [i for i in infos if i["within_bound"]]
    if within:
        assert infos[-1]["within_bound"] and len(within) == 1 and infos[-1]["best"]
        assert not any(i["best"] for i in infos[:-1])
    else:
        assert len(infos) == budget and not any(i["best"] for i in infos)


def test_search_respects_the_budget_and_the_bound(teacher, student, digits):
    from shrinkfleet import training
    from tasks.compress import search, search_order

    teacher_val = training.accuracy(teacher, digits.val.x, digits.val.y)
    common = {"sparsities": [0.5, 0.9], "clusters": [4, 16], "conversions": ["float32"]}
    stages = {"cluster": {"epochs": 1}, "prune": {**TINY_PARAMS["prune"], "epochs": 1}}
    cfg = _resolved(search={"enabled": True, "budget": 3, "max_accuracy_drop": 1.0, **common}, **stages)
    order = search_order(cfg)
    assert order[0][:2] == (0.9, 4)  # the smallest expected candidate first
    trials = search(cfg, teacher, student, digits)
    assert len(trials) == 1  # any candidate is within a bound of 100 points: the first one ends it
    _check_search(trials, 1.0, 3, teacher_val, digits)
    # A bound just under what the first candidate lost: the search must go on past it.
    first_drop = next(iter(trials.values())).search["val_drop"]
    assert first_drop > 0.005, "the first candidate (90% sparse, 4 clusters) should lose accuracy"
    bound = max(first_drop - 0.005, 0.0)
    tighter = _resolved(search={"enabled": True, "budget": 3, "max_accuracy_drop": bound, **common}, **stages)
    trials = search(tighter, teacher, student, digits)
    assert len(trials) >= 2 and not next(iter(trials.values())).search["within_bound"]
    _check_search(trials, bound, 3, teacher_val, digits)


CHANNEL_RECIPES = {"ch-int8": {"from": "student", "steps": [{"channels": {"keep": 0.5}}, "int8"]},
                   "ch-clustered": {"from": "student", "steps": ["channels", "cluster", "float32"]},
                   "student-int8": {"from": "student", "steps": ["int8"]},
                   "student-clustered": {"from": "student", "steps": ["cluster", "float32"]}}


def test_channels_recipes_give_smaller_working_variants_and_list_full_width_layers(teacher, student, pruned,
                                                                                    digits):
    """["channels", "int8"] and ["channels", "cluster", "float32"]: the channel-pruned model goes on
    through clustering and int8 like any model, and each variant is smaller than the same recipe without it."""
    from shrinkfleet.macs import count_macs
    from tasks.compress import compress

    cfg = _resolved(recipes=CHANNEL_RECIPES, channels={"epochs": 1}, cluster={"clusters": 8, "epochs": 1})
    variants, not_applicable = compress(cfg, {"teacher": teacher, "student": student, "pruned": pruned}, digits)
    assert not_applicable == {}
    for chan, plain in (("ch-int8", "student-int8"), ("ch-clustered", "student-clustered")):
        v = variants[chan]
        assert len(v.content) < len(variants[plain].content)
        assert v.steps[0] == "channels(0.5)"
        info = v.settings["0.channels"]
        assert info["macs_before"] == count_macs(student) and info["macs_after"] < info["macs_before"]
        assert info["kept"] == {"dense_0": [16, 32]}
        # The output layer cannot lose units: listed, with why, in the variant's metadata.
        assert set(v.skipped["0.channels"]) == {"logits"} and "full_width" not in info
        tfl = TFLiteModel(v.content)
        assert tfl.predict(digits.test.x[:5]).shape == (5, 10)
        assert accuracy_of(tfl.predict, digits.test.x, digits.test.y) > 0.6


def test_channels_keep_auto_and_target_macs(student, digits):
    from shrinkfleet.config import ChannelsConfig
    from shrinkfleet.macs import count_macs
    from shrinkfleet.techniques import channel_prune

    model, info = channel_prune(student, ChannelsConfig(target_macs=0.6, epochs=0), digits, seed=0)
    assert count_macs(model) <= 0.6 * count_macs(student) and info["macs_after"] == count_macs(model)
    model, info = channel_prune(student, ChannelsConfig(keep="auto", auto_max_drop=0.02, epochs=0), digits, seed=0)
    assert len(info["sensitivity"]) == 3 and info["auto_val_drop_before_fine_tuning"] <= 0.02
    assert set(info["keep"]) == {"dense_0"}


def test_channels_target_macs_out_of_reach_is_a_verdict(student, digits):
    from shrinkfleet.config import ChannelsConfig
    from shrinkfleet.techniques import NotApplicable, channel_prune

    # The logits layer stays whole: a 1-unit hidden layer still leaves 1 x 10 of its MACs and 64 x 1 of dense_0's.
    with pytest.raises(NotApplicable, match="target_macs 0.01 is out of reach"):
        channel_prune(student, ChannelsConfig(target_macs=0.01, epochs=0), digits, seed=0)


def test_auto_pruning_and_channels_recipes_through_the_prune_and_compress_stages(teacher, student, tmp_path):
    """As ``shrinkfleet stage prune|compress`` run them: the prune stage writes its sensitivity table and
    plot and prunes to the chosen levels; the compress stage writes the channels variants, their
    sensitivity files and the layers kept at full width in the manifest."""
    import copy
    import json

    import yaml

    from shrinkfleet import zoo
    from tasks import compress as compress_stage
    from tasks import prepare
    from tasks import prune as prune_stage
    from tasks.common import context

    params = copy.deepcopy(TINY_PARAMS)
    params["models"] = {"digits-mlp": params["models"]["digits-mlp"]}
    params["prune"]["layer_sparsity"] = "auto"
    params["channels"] = {"epochs": 1}
    params["recipes"] = {"ch-int8": {"from": "student", "steps": ["channels", "int8"]},
                         "ch-auto-clustered": {"steps": [{"channels": {"keep": "auto"}},
                                                         {"prune": {"layer_sparsity": "auto"}}, "cluster",
                                                         "float32"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ctx = context(tmp_path)
    prepare.run(ctx, "digits")
    zoo.save(teacher, ctx.ws.keras("digits-mlp", "teacher"))
    zoo.save(student, ctx.ws.keras("digits-mlp", "student"))

    result = prune_stage.run(ctx, "digits-mlp")
    table = tmp_path / "metrics" / "digits-mlp-prune-sensitivity.csv"
    assert sorted(result["sensitivity_files"]) == [f"metrics/digits-mlp-prune-sensitivity.{e}"
                                                   for e in ("csv", "json", "png")]
    assert len(table.read_text().splitlines()) == 1 + 2 * 5  # header + 2 layers x 5 default levels
    assert result["auto_val_drop_before_fine_tuning"] <= 0.01
    pruned = zoo.load(ctx.ws.keras("digits-mlp", "pruned"))
    zeros = {layer.name: np.mean(layer.kernel.numpy() == 0) for layer in pruned.layers if hasattr(layer, "kernel")}
    assert zeros == pytest.approx(result["layer_sparsity"], abs=0.02)

    out = compress_stage.run(ctx, "digits-mlp")
    assert out["not_applicable"] == {}
    vdir = ctx.ws.variants_dir("digits-mlp")
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["ch-int8"]["skipped"]["0.channels"] == {"logits": "an output of the model (outputs are never "
                                                                      "pruned)"}
    assert manifest["ch-int8"]["settings"]["0.channels"]["kept"] == {"dense_0": [16, 32]}
    entry = manifest["ch-auto-clustered"]
    assert entry["steps"] == ["channels(auto)", "prune(auto)", "cluster(8)", "float32"]
    assert sorted(entry["files"]) == sorted(f"ch-auto-clustered-{m}-sensitivity.{e}" for m in ("channels", "prune")
                                            for e in ("csv", "json", "png"))
    assert all((vdir / f).is_file() for f in entry["files"])
    levels = entry["settings"]["1.prune"]["layer_sparsity"]  # resolved on the channel-pruned model
    assert set(levels) == {"dense_0", "logits"} and all(0 <= v < 1 for v in levels.values())


def test_channels_step_on_a_residual_cnn_prunes_the_add_group_and_converts_to_int8(digits):
    """Conv + BatchNorm + a residual Add: the Add's two inputs lose the same filters, the rest is cut,
    and the smaller model converts to full-integer int8 with the same output shape."""
    from shrinkfleet.config import ChannelsConfig
    from shrinkfleet.evaluation import to_tflite
    from shrinkfleet.macs import count_macs
    from shrinkfleet.techniques import channel_prune
    from shrinkfleet.tfenv import keras

    L = keras.layers
    x = keras.Input(digits.train.x.shape[1:])
    h = L.ReLU()(L.BatchNormalization(name="bn_a")(L.Conv2D(16, 3, padding="same", name="conv_a")(x)))
    r = L.Conv2D(16, 3, padding="same", name="conv_r")(h)
    h = L.Add(name="add")([h, r])
    h = L.Conv2D(16, 3, padding="same", activation="relu", name="conv_b")(h)
    h = L.Dense(24, activation="relu", name="dense")(L.Flatten()(L.MaxPooling2D()(h)))
    model = keras.Model(x, L.Dense(10, name="logits")(h))
    pruned, info = channel_prune(model, ChannelsConfig(keep=0.5, epochs=1), digits, seed=0)
    assert set(info["kept"]) == {"conv_a", "conv_r", "conv_b", "dense"}
    assert info["groups"] == {"conv_a": ["conv_a", "conv_r"]} and info["kept"]["conv_a"] == [8, 16]
    assert set(info["full_width"]) == {"logits"}
    assert count_macs(pruned) < count_macs(model) and pruned.count_params() < model.count_params()
    tfl = TFLiteModel(to_tflite(pruned, "int8", digits.train.x[:50]))
    assert tfl.predict(digits.test.x[:7]).shape == (7, 10)


def test_search_candidates_keep_their_sparsity_when_prune_layer_sparsity_is_auto(teacher, student, digits):
    from tasks.compress import search

    cfg = _resolved(prune={**TINY_PARAMS["prune"], "epochs": 1, "layer_sparsity": "auto"}, cluster={"epochs": 1},
                    search={"enabled": True, "budget": 1, "max_accuracy_drop": 1.0, "sparsities": [0.9],
                            "clusters": [16], "conversions": ["float32"]})
    (trial,) = search(cfg, teacher, student, digits).values()
    assert trial.settings["prune"]["layer_sparsity"] == {}
    assert tflite_sparsity(TFLiteModel(trial.content)) == pytest.approx(0.9, abs=0.02)
