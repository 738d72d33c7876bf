"""Artifacts are reproducible: the same model gives the same bytes, whenever it is saved or converted."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile

import numpy as np
import pytest

from shrinkfleet import zoo
from shrinkfleet.config import CnnArch, MlpArch
from shrinkfleet.evaluation import to_tflite
from tasks.compress import encode_best


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path):
    model = zoo.build(CnnArch(filters=[4], dense=[8]), (8, 8, 1), 3, name="m")
    zoo.save(model, tmp_path / "a.keras")
    time.sleep(1.1)  # Keras stamps the second; a later save must not differ
    zoo.save(model, tmp_path / "b.keras")
    assert _digest(tmp_path / "a.keras") == _digest(tmp_path / "b.keras")
    with zipfile.ZipFile(tmp_path / "a.keras") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert "date_saved" not in json.loads(zf.read("metadata.json"))


def test_a_reproducible_archive_still_loads_as_the_same_model(tmp_path):
    model = zoo.build(MlpArch(hidden=[5]), (4,), 2, name="m")
    zoo.save(model, tmp_path / "m.keras")
    loaded = zoo.load(tmp_path / "m.keras")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m.keras").st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0o600


def test_different_weights_give_different_bytes(tmp_path):
    a = zoo.build(MlpArch(hidden=[5]), (4,), 2, name="m")
    b = zoo.clone(a)
    b.set_weights([w + 1 for w in a.get_weights()])
    zoo.save(a, tmp_path / "a.keras")
    zoo.save(b, tmp_path / "b.keras")
    assert _digest(tmp_path / "a.keras") != _digest(tmp_path / "b.keras")


def test_conversion_and_coding_are_reproducible():
    model = zoo.build(MlpArch(hidden=[16]), (6,), 3, name="m")
    rep = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    for mode in ("float32", "int8"):
        first, second = to_tflite(model, mode, rep), to_tflite(model, mode, rep)
        assert first == second, mode
        assert encode_best(first) == encode_best(second), mode


@pytest.mark.slow
def test_an_application_trained_briefly_from_scratch_predicts_from_its_own_statistics():
    """MobileNetV2's BatchNormalization layers come with momentum 0.999: after a few epochs from scratch
    their moving statistics are still the initial ones, and the model predicts at chance outside training.
    shrinkfleet builds applications with momentum 0.9 (``batchnorm_momentum``); null keeps the constructor's."""
    import dataclasses

    from shrinkfleet.config import ApplicationArch, SplitConfig, TrainConfig
    from shrinkfleet.datasets import Split, load_sklearn, prepare
    from shrinkfleet.evaluation import accuracy_of
    from tasks.teacher import train_teacher

    digits = prepare(load_sklearn("digits"), SplitConfig(), seed=0)

    def upscaled(s: Split) -> Split:  # 8x8 digits as 32x32 images (MobileNetV2's smallest input)
        return Split(np.kron(s.x, np.ones((1, 4, 4, 1), dtype=s.x.dtype)), s.y)

    data = dataclasses.replace(digits, train=upscaled(digits.train), val=upscaled(digits.val),
                               test=upscaled(digits.test), meta={**digits.meta, "input_shape": [32, 32, 1]})
    cfg = TrainConfig(epochs=3, batch_size=32, learning_rate=2e-3, patience=0)
    accuracy = {}
    for momentum in (0.9, None):
        arch = ApplicationArch(name="MobileNetV2", options={"alpha": 0.35}, batchnorm_momentum=momentum)
        model, _ = train_teacher(arch, cfg, data, seed=0)
        accuracy[momentum] = accuracy_of(lambda x, m=model: m.predict(x, verbose=0), data.test.x, data.test.y)
    assert accuracy[0.9] >= 0.6, accuracy
    assert accuracy[None] <= 0.3, accuracy  # the control: the constructor's momentum, the same training
