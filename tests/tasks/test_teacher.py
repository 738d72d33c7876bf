from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import training
from shrinkfleet.config import CnnArch, DistillConfig, MlpArch, TrainConfig


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


def test_mixed_precision_trains_in_float16_and_saves_float32(digits, teacher):
    """What a GPU worker with run.mixed_precision does, forced here on the CPU."""
    from shrinkfleet.tfenv import keras
    from tasks.distill import distill
    from tasks.teacher import train_teacher

    seen = []

    class Policy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.extend((layer.name, layer.dtype_policy.name) for layer in self.model.layers)

    from shrinkfleet import training as training_mod

    original = training_mod.fit

    def spy(model, *args, callbacks=None, **kwargs):
        return original(model, *args, callbacks=[*(callbacks or []), Policy()], **kwargs)

    training_mod.fit = spy
    try:
        cfg = TrainConfig(epochs=4, patience=0, learning_rate=3e-3)
        model, history = train_teacher(MlpArch(hidden=[16]), cfg, digits, 0, mixed_precision=True)
        dcfg = DistillConfig(epochs=6, patience=0, learning_rate=5e-3)
        student, _ = distill(teacher, MlpArch(hidden=[16]), dcfg, digits, seed=0, mixed_precision=True)
    finally:
        training_mod.fit = original
    assert ("dense_0", "mixed_float16") in seen  # hidden layers computed in float16 while training
    assert ("logits", "float32") in seen  # logits stay float32 for the softmax / KL
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for the next stage
    for m in (model, student):
        assert {layer.dtype_policy.name for layer in m.layers} == {"float32"}
    assert all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    reference, _ = train_teacher(MlpArch(hidden=[16]), cfg, digits, 0)  # the same run in float32
    acc, ref = (training.accuracy(m, digits.test.x, digits.test.y) for m in (model, reference))
    assert ref > 0.7 and abs(acc - ref) < 0.05, (acc, ref)
    ref_student, _ = distill(teacher, MlpArch(hidden=[16]), dcfg, digits, seed=0)
    acc, ref = (training.accuracy(m, digits.test.x, digits.test.y) for m in (student, ref_student))
    assert ref > 0.7 and abs(acc - ref) < 0.05, (acc, ref)


def test_validation_runs_only_when_early_stopping_needs_it(digits):
    from tasks.teacher import train_teacher

    _, plain = train_teacher(MlpArch(hidden=[8]), TrainConfig(epochs=2, patience=0), digits, 0)
    _, early = train_teacher(MlpArch(hidden=[8]), TrainConfig(epochs=2, patience=1), digits, 0)
    assert len(plain["loss"]) == 2 and not any(k.startswith("val_") for k in plain)
    assert len(early["val_loss"]) == len(early["loss"]) >= 1
