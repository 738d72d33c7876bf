"""Artifacts are reproducible: the same model gives the same bytes, whenever it is saved or converted."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile

import numpy as np

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
