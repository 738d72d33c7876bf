"""count_macs / macs_by_layer against hand-computed counts."""

from __future__ import annotations

import pytest

from shrinkfleet.macs import count_macs, macs_by_layer
from shrinkfleet.tfenv import keras

L = keras.layers


def test_dense_model_counts_inputs_times_units():
    model = keras.Sequential([L.Dense(16, activation="relu", input_shape=(10,)), L.Dropout(0.1), L.Dense(3)])
    assert macs_by_layer(model) == {"dense": 10 * 16, "dropout": 0, "dense_1": 16 * 3}
    assert count_macs(model) == 10 * 16 + 16 * 3


def test_conv_model_counts_every_output_position():
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)            # 12*12 * 3*3*3 * 8
    x = L.BatchNormalization(name="bn")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)          # 10*10 * 3*3 * 8*2
    x = L.Conv2D(4, 3, groups=4, strides=2, name="grouped")(x)          # 4*4 * 3*3*(16/4) * 4
    x = L.SeparableConv2D(6, 3, padding="same", name="sep")(x)          # 4*4*3*3*4 + 4*4*4*6
    x = L.Flatten(name="flat")(x)
    outputs = L.Dense(5, name="out")(x)                                 # 96 * 5
    model = keras.Model(inputs, outputs)
    expected = {"conv": 144 * 27 * 8, "bn": 0, "dw": 100 * 9 * 16, "grouped": 16 * 9 * 4 * 4,
                "sep": 16 * 9 * 4 + 16 * 4 * 6, "flat": 0, "out": 96 * 5}
    assert macs_by_layer(model) == expected
    assert count_macs(model) == sum(expected.values())


def test_mobilenetv2_gives_a_plausible_count():
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    # About 59 M MACs at 224x224 scale by (32/224)^2 to roughly 1.2 M.
    assert 0.8e6 < count_macs(model) < 2e6


def test_unknown_input_size_is_refused_with_the_reason():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match="fixed input shapes"):
        count_macs(model)
