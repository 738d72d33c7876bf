from __future__ import annotations

import pytest

from shrinkfleet import training
from shrinkfleet.config import CnnArch, MlpArch, TrainConfig


def test_teacher_learns_the_digits(teacher, digits):
    assert training.accuracy(teacher, digits.test.x, digits.test.y) > 0.9


def test_cnn_teacher_trains_on_images(digits):
    from tasks.teacher import train_teacher

    model, history = train_teacher(CnnArch(filters=[4], dense=[]), TrainConfig(epochs=2, patience=0), digits, 0)
    assert model.output_shape == (None, 10)
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]


def test_cnn_on_tabular_data_is_a_clear_error():
    from shrinkfleet.config import SplitConfig
    from shrinkfleet.datasets import load_sklearn, prepare
    from tasks.teacher import train_teacher

    data = prepare(load_sklearn("iris"), SplitConfig(), seed=0)
    with pytest.raises(ValueError, match="cnn needs image inputs .* use arch: mlp"):
        train_teacher(CnnArch(), TrainConfig(epochs=1), data, 0)


def test_training_is_reproducible_with_a_seed(digits):
    from tasks.teacher import train_teacher

    cfg = TrainConfig(epochs=1, patience=0)
    a, _ = train_teacher(MlpArch(hidden=[8]), cfg, digits, 5)
    b, _ = train_teacher(MlpArch(hidden=[8]), cfg, digits, 5)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        assert (wa == wb).all()
