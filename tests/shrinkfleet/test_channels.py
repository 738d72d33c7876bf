"""prune_channels: smaller models that compute what the original computes on the kept channels."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet.channels import prune_channels
from shrinkfleet.macs import count_macs
from shrinkfleet.tfenv import keras, reset

L = keras.layers


def _randomise(model: keras.Model, seed: int = 0) -> keras.Model:
    """Random weights everywhere (BatchNorm's statistics too), so no unit is trivially zero."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for var, w in zip(layer.weights, layer.get_weights(), strict=True):
            if "moving_variance" in var.name:
                values.append(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
            else:
                values.append(rng.normal(0, 0.5, w.shape).astype("float32"))
        layer.set_weights(values)
    return model


def mlp() -> keras.Model:
    return keras.Sequential([L.Dense(16, activation="relu", input_shape=(12,), name="d1"), L.Dropout(0.2, name="drop"),
                             L.Dense(10, activation="relu", name="d2"), L.Dense(3, name="out")])


def cnn() -> keras.Model:
    return keras.Sequential([L.Conv2D(8, 3, input_shape=(10, 10, 3), name="c1"), L.BatchNormalization(name="bn1"),
                             L.ReLU(name="r1"), L.MaxPooling2D(name="pool"), L.Conv2D(6, 3, name="c2"),
                             L.Flatten(name="flat"), L.Dense(12, activation="relu", name="d1"), L.Dense(4, name="out")])


def depthwise() -> keras.Model:
    inputs = keras.Input((9, 9, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(6.0, name="r1")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="r2")(x)
    x = L.Conv2D(6, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(4, name="out")(x))


BUILDERS = {"mlp": mlp, "cnn": cnn, "depthwise": depthwise}


def _inputs(model: keras.Model, n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, *model.input_shape[1:])).astype("float32")


def _zero_removed(model: keras.Model, result, follow: dict[str, list[str]] | None = None) -> keras.Model:
    """A copy of ``model`` whose removed units output exactly 0, which every layer after them keeps 0.

    A removed filter's kernel and bias are zeroed; a BatchNorm after it gets beta = moving mean = 0
    on that channel (so it maps 0 to 0); a depthwise layer after it gets bias 0 on the channels
    that channel feeds. Written per test model, independently of the code under test.
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    follow = {"c1": ["bn1", "dw", "bn2"]} if follow is None else follow
    for name, kept in result.kept.items():
        removed = np.setdiff1d(np.arange(result.total[name]), kept)
        kernel, bias = copy.get_layer(name).get_weights()
        kernel[..., removed] = 0
        bias[removed] = 0
        copy.get_layer(name).set_weights([kernel, bias])
        channels = removed
        for after in follow.get(name, []):
            if after not in [layer.name for layer in copy.layers]:
                continue
            layer = copy.get_layer(after)
            w = layer.get_weights()
            if isinstance(layer, L.BatchNormalization):
                gamma, beta, mean, var = w
                beta[channels] = 0
                mean[channels] = 0
                layer.set_weights([gamma, beta, mean, var])
            else:
                mult = layer.depth_multiplier
                channels = (channels[:, None] * mult + np.arange(mult)).ravel()
                w[1][channels] = 0
                layer.set_weights(w)
    return copy


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_half_the_channels_keeps_the_output_shape_and_cuts_macs_and_parameters(kind):
    reset(0)
    model = _randomise(BUILDERS[kind]())
    result = prune_channels(model, keep=0.5)
    x = _inputs(model)
    assert result.model.predict(x, verbose=0).shape == model.predict(x, verbose=0).shape
    assert count_macs(result.model) < count_macs(model)
    assert result.model.count_params() < model.count_params()
    assert result.kept and "out" not in result.kept
    for name, (kept, total) in result.summary().items():
        assert kept == int(np.ceil(0.5 * total)), name


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_keep_one_reproduces_the_original(kind):
    reset(0)
    model = _randomise(BUILDERS[kind]())
    result = prune_channels(model, keep=1.0)
    x = _inputs(model)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert count_macs(result.model) == count_macs(model)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_pruned_model_equals_the_original_with_removed_units_zeroed(kind, norm):
    """Proves the slicing is right: across BatchNorm, depthwise channels and Flatten's index mapping."""
    reset(0)
    model = _randomise(BUILDERS[kind]())
    result = prune_channels(model, keep=0.4, norm=norm)
    assert any(len(k) < result.total[n] for n, k in result.kept.items())
    zeroed = _zero_removed(model, result)
    x = _inputs(model)
    expected = zeroed.predict(x, verbose=0)
    assert not np.allclose(expected, model.predict(x, verbose=0), atol=1e-3)  # zeroing did change something
    np.testing.assert_allclose(result.model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)


def test_the_input_model_is_not_modified():
    reset(0)
    model = _randomise(cnn())
    before = [w.copy() for w in model.get_weights()]
    prune_channels(model, keep=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert model.get_layer("c1").filters == 8


def residual() -> keras.Model:
    """Two residual blocks in one stage (BatchNorm and ReLU after the Add), then a Dense head."""
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(8, 3, padding="same", name="c0")(inputs)))
    y = L.ReLU(name="r1")(L.Conv2D(6, 3, padding="same", name="c1")(x))
    y = L.BatchNormalization(name="bn2")(L.Conv2D(8, 1, name="c2")(y))
    x = L.ReLU(name="r2")(L.Add(name="add1")([x, y]))
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="c3")(x)
    y = L.Conv2D(8, 1, name="c4")(y)
    x = L.Add(name="add2")([x, y])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_residual_stage_prunes_the_layers_feeding_its_adds_together(norm):
    """The Adds' inputs keep one channel set: c0, c2 and c4 lose the same filters, c1 and c3 their own."""
    reset(0)
    model = _randomise(residual())
    result = prune_channels(model, keep=0.5, norm=norm)
    assert result.groups == {"c0": ["c0", "c2", "c4"]}
    assert result.full_width == {"out": "an output of the model (outputs are never pruned)"}
    assert result.kept["c0"] == result.kept["c2"] == result.kept["c4"]
    assert result.summary() == {"c0": (4, 8), "c1": (3, 6), "c2": (4, 8), "c3": (4, 8), "c4": (4, 8)}
    # Ranked by the group's summed norms: not simply c0's own order.
    scores = [np.abs(model.get_layer(n).get_weights()[0]).reshape(-1, 8).sum(0) if norm == "l1" else
              (model.get_layer(n).get_weights()[0].reshape(-1, 8) ** 2).sum(0) for n in ("c0", "c2", "c4")]
    assert result.kept["c0"] == sorted(np.argsort(-sum(scores), kind="stable")[:4].tolist())
    zeroed = _zero_removed(model, result, {"c0": ["bn0"], "c2": ["bn2"]})
    x = _inputs(model)
    expected = zeroed.predict(x, verbose=0)
    assert not np.allclose(expected, model.predict(x, verbose=0), atol=1e-3)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)
    assert count_macs(result.model) < 0.5 * count_macs(model)


def test_naming_one_member_of_a_group_prunes_the_whole_group():
    reset(0)
    model = _randomise(residual())
    result = prune_channels(model, keep={"c2": 0.5})
    assert result.summary() == {"c0": (4, 8), "c2": (4, 8), "c4": (4, 8)}
    assert prune_channels(model, keep={"c2": 0.5, "c4": 0.75}).summary()["c0"] == (6, 8)  # the largest named


def test_an_identity_shortcut_from_the_input_keeps_its_group_whole_and_says_why():
    reset(0)
    inputs = keras.Input((8, 8, 6))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
    y = L.Conv2D(6, 3, padding="same", name="b")(x)
    x = L.Add(name="add")([inputs, y])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = _randomise(keras.Model(inputs, L.Dense(3, name="out")(x)))
    result = prune_channels(model, keep=0.5)
    x = _inputs(model)
    assert result.model.predict(x, verbose=0).shape == (len(x), 3)
    assert set(result.full_width) == {"b", "out"}
    assert "'add' (Add)" in result.full_width["b"] and "(InputLayer)" in result.full_width["b"]
    assert result.summary() == {"a": (4, 8)} and result.groups == {}
    assert count_macs(result.model) < count_macs(model)


def test_a_merge_fed_through_a_flatten_is_not_grouped():
    reset(0)
    inputs = keras.Input((4, 4, 2))
    a = L.Flatten(name="flat")(L.Conv2D(3, 1, name="conv")(inputs))
    b = L.Dense(48, name="dense")(L.Flatten(name="flat_in")(inputs))
    x = L.Add(name="add")([a, b])
    model = _randomise(keras.Model(inputs, L.Dense(2, name="out")(x)))
    result = prune_channels(model, keep=0.5)
    assert result.kept == {}
    assert "'add' (Add)" in result.full_width["conv"] and "'add' (Add)" in result.full_width["dense"]
    x = _inputs(model)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_concatenate_and_model_outputs_are_not_followed():
    reset(0)
    inputs = keras.Input((6,))
    a = L.Dense(4, name="a")(inputs)
    b = L.Dense(4, name="b")(inputs)
    x = L.Concatenate(name="cat")([a, b])
    hidden = L.Dense(5, name="hidden")(x)
    out = L.Dense(2, name="out")(hidden)
    model = keras.Model(inputs, [out, hidden])
    result = prune_channels(model, keep=0.5)
    assert "Concatenate" in result.full_width["a"] and "Concatenate" in result.full_width["b"]
    assert "output of the model" in result.full_width["hidden"]
    assert result.kept == {}
    x = _inputs(model)
    for got, want in zip(result.model.predict(x, verbose=0), model.predict(x, verbose=0), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_units_are_ranked_by_the_chosen_norm():
    model = keras.Sequential([L.Dense(2, input_shape=(4,), name="d"), L.Dense(1, name="out")])
    # Unit 0 has the larger L1 norm (4 > 3), unit 1 the larger L2 norm (3 > 2).
    model.get_layer("d").set_weights([np.array([[1, 3], [1, 0], [1, 0], [1, 0]], "float32"), np.zeros(2, "float32")])
    assert prune_channels(model, keep=0.5, norm="l1").kept == {"d": [0]}
    assert prune_channels(model, keep=0.5, norm="l2").kept == {"d": [1]}


def test_per_layer_keep_prunes_only_the_named_layers():
    reset(0)
    model = _randomise(mlp())
    result = prune_channels(model, keep={"d2": 0.3})
    assert result.summary() == {"d2": (3, 10)}


def test_round_to_keeps_a_multiple_of_it_never_above_the_width():
    reset(0)
    model = _randomise(mlp())
    assert prune_channels(model, keep=0.3, round_to=4).summary() == {"d1": (8, 16), "d2": (4, 10)}
    assert prune_channels(model, keep=0.9, round_to=4).summary() == {"d1": (16, 16), "d2": (10, 10)}
    grouped = prune_channels(_randomise(residual()), keep=0.3, round_to=4).summary()
    assert grouped["c0"] == grouped["c4"] == (4, 8) and grouped["c1"] == (4, 6)
    with pytest.raises(ValueError, match="round_to: must be a whole number >= 1"):
        prune_channels(model, keep=0.5, round_to=0)


def test_mobilenetv2_survives_half_the_channels():
    reset(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    result = prune_channels(model, keep=0.5)
    x = _inputs(model, 2)
    assert result.model.predict(x, verbose=0).shape == (2, 10)
    assert count_macs(result.model) < count_macs(model)
    assert set(result.full_width) == {"predictions"}
    assert result.groups["block_1_project"] == ["block_1_project", "block_2_project"]
    assert result.kept["block_13_project"] == result.kept["block_15_project"]
    assert "block_1_expand" in result.kept and "Conv1" in result.kept
    assert count_macs(result.model) < 0.4 * count_macs(model)


@pytest.mark.parametrize(("keep", "norm", "message"), [
    (0.0, "l1", "keep: must be a fraction in \\(0, 1\\]"),
    (1.5, "l1", "keep: must be a fraction in \\(0, 1\\]"),
    ({"d1": -1}, "l1", "keep\\['d1'\\]: must be a fraction"),
    ({"nope": 0.5}, "l1", "no layer named 'nope'"),
    (0.5, "l3", "norm: must be 'l1' or 'l2'"),
])
def test_bad_arguments_are_refused_with_the_cause(keep, norm, message):
    with pytest.raises(ValueError, match=message):
        prune_channels(mlp(), keep=keep, norm=norm)


def test_unbuilt_model_is_refused():
    with pytest.raises(ValueError, match="not built"):
        prune_channels(keras.Sequential([L.Dense(3)]), keep=0.5)


def test_nested_models_and_softmax_layers_are_kept_whole_and_the_model_still_works():
    reset(0)
    inner = keras.Sequential([L.Dense(5, activation="relu", input_shape=(8,)), L.Dense(4)], name="inner")
    inputs = keras.Input((6,))
    x = L.Dense(8, name="a")(inputs)
    x = L.Dense(7, activation="softmax", name="sm")(inner(x))
    model = _randomise(keras.Model(inputs, L.Dense(2, name="out")(x)))
    result = prune_channels(model, keep=0.5)
    assert result.kept == {}
    assert "'inner' (Sequential)" in result.full_width["a"]
    assert "softmax" in result.full_width["sm"]
    x = _inputs(model)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_separable_conv_gets_the_depthwise_and_pointwise_slices():
    reset(0)
    model = keras.Sequential([L.Conv2D(6, 3, input_shape=(8, 8, 2), name="c1"), L.BatchNormalization(name="bn1"),
                              L.SeparableConv2D(5, 3, depth_multiplier=2, name="sep"),
                              L.GlobalAveragePooling2D(name="gap"), L.Dense(3, name="out")])
    model = _randomise(model)
    result = prune_channels(model, keep=0.5)
    assert result.summary() == {"c1": (3, 6)}
    zeroed = _zero_removed(model, result)
    x = _inputs(model)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), zeroed.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
