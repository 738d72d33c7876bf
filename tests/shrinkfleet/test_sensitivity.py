"""Sensitivity analysis: one row per prunable layer and level; auto levels follow sensitivity and keep the bound."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import sensitivity, training
from shrinkfleet.channels import prune_channels
from shrinkfleet.config import SplitConfig
from shrinkfleet.datasets import load_sklearn, prepare
from shrinkfleet.tfenv import keras, reset

LEVELS = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def digits():
    return prepare(load_sklearn("digits"), SplitConfig(), seed=0)


@pytest.fixture(scope="module")
def bottlenecked(digits):
    """A wide hidden layer (256 units) feeding a 4-unit tanh bottleneck, the sensitive one for channel pruning."""
    reset(0)
    x = keras.Input(digits.train.x.shape[1:])
    h = keras.layers.Dense(256, activation="relu", name="wide")(keras.layers.Flatten()(x))
    h = keras.layers.Dense(4, activation="tanh", name="bottleneck")(h)
    model = keras.Model(x, keras.layers.Dense(10, name="logits")(h))
    loss, metrics = training.objective("logits")
    training.fit(model, digits.train.x, digits.train.y, (digits.val.x, digits.val.y), loss=loss, metrics=metrics,
                 epochs=25, batch_size=64, learning_rate=3e-3, patience=0, seed=0)
    return model


@pytest.mark.parametrize("method, layers", [("prune", ["wide", "bottleneck", "logits"]),
                                            ("channels", ["wide", "bottleneck"])])
def test_the_table_has_one_row_per_prunable_layer_and_level(bottlenecked, digits, method, layers):
    rows = sensitivity.analyse(bottlenecked, digits.val.x, digits.val.y, LEVELS, method)
    assert [(r["layer"], r["level"]) for r in rows] == [(n, v) for n in layers for v in LEVELS]
    base = training.accuracy(bottlenecked, digits.val.x, digits.val.y)
    assert all(r["drop"] == pytest.approx(base - r["accuracy"]) for r in rows)
    # The row measures the model with only that layer pruned (checked against channel pruning done by hand).
    if method == "channels":
        by_hand = training.accuracy(prune_channels(bottlenecked, {"bottleneck": 0.5}).model, digits.val.x,
                                    digits.val.y)
        assert rows[layers.index("bottleneck") * 3 + 1]["accuracy"] == pytest.approx(by_hand)


# Magnitude pruning: the 60-weight logits layer is far more sensitive than the 16k-weight wide one;
# channel pruning: the 4-unit tanh bottleneck more than the 256-unit wide layer.
@pytest.mark.parametrize("method, sensitive", [("prune", "logits"), ("channels", "bottleneck")])
def test_auto_levels_differ_with_sensitivity_and_respect_the_bound(bottlenecked, digits, method, sensitive):
    rows = sensitivity.analyse(bottlenecked, digits.val.x, digits.val.y, LEVELS, method)
    chosen, drop = sensitivity.choose(bottlenecked, digits.val.x, digits.val.y, rows, max_drop=0.02)
    assert set(chosen) == {r["layer"] for r in rows}
    assert chosen["wide"] > chosen[sensitive], chosen
    # The bound holds for the model with every chosen level applied at once, measured independently.
    base = training.accuracy(bottlenecked, digits.val.x, digits.val.y)
    if method == "channels":
        model = prune_channels(bottlenecked, {n: 1 - v for n, v in chosen.items() if v > 0}).model
    else:
        model = keras.models.clone_model(bottlenecked)
        model.set_weights(bottlenecked.get_weights())
        for name, level in chosen.items():
            layer = model.get_layer(name)
            layer.kernel.assign(sensitivity.zero_smallest(layer.kernel.numpy(), level))
            assert np.mean(layer.kernel.numpy() == 0) == pytest.approx(level, abs=0.01)
    assert base - training.accuracy(model, digits.val.x, digits.val.y) == pytest.approx(drop)
    assert drop <= 0.02


def test_the_input_model_is_not_changed(bottlenecked, digits):
    before = [w.copy() for w in bottlenecked.get_weights()]
    sensitivity.analyse(bottlenecked, digits.val.x, digits.val.y, LEVELS, "prune")
    assert all(np.array_equal(a, b) for a, b in zip(before, bottlenecked.get_weights(), strict=True))


def test_files_are_a_csv_table_a_json_copy_and_a_png_plot(bottlenecked, digits, tmp_path):
    rows = sensitivity.analyse(bottlenecked, digits.val.x, digits.val.y, LEVELS, "prune")
    paths = sensitivity.write(rows, tmp_path, "m-prune-sensitivity", "m")
    assert sorted(p.name for p in paths) == ["m-prune-sensitivity.csv", "m-prune-sensitivity.json",
                                             "m-prune-sensitivity.png"]
    lines = (tmp_path / "m-prune-sensitivity.csv").read_text().splitlines()
    assert lines[0] == "layer,method,level,accuracy,drop" and len(lines) == 1 + len(rows)
    assert (tmp_path / "m-prune-sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("levels, method, match", [([0.5, 1.0], "prune", r"fractions in \(0, 1\)"),
                                                   ([0.5], "sideways", "one of prune, channels")])
def test_bad_levels_and_methods_are_refused(bottlenecked, digits, levels, method, match):
    with pytest.raises(ValueError, match=match):
        sensitivity.analyse(bottlenecked, digits.val.x, digits.val.y, levels, method)
