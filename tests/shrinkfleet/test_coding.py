"""Entropy coding of flatbuffers: exact round trips, and smaller than gzip where it should be."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkfleet import coding
from shrinkfleet.config import MlpArch, SplitConfig, TrainConfig
from shrinkfleet.datasets import load_sklearn, prepare
from shrinkfleet.evaluation import TFLiteModel, gzip_size, to_tflite


@pytest.fixture(scope="module")
def digits():
    return prepare(load_sklearn("digits"), SplitConfig(), seed=0)


@pytest.fixture(scope="module")
def sparse_clustered(digits):
    """A trained MLP with 90% of every kernel zero and 8 shared values per kernel (no TFMOT needed)."""
    from tasks.teacher import train_teacher

    model, _ = train_teacher(MlpArch(hidden=[128]), TrainConfig(epochs=4, patience=0), digits, 0)
    weights = []
    for w in model.get_weights():
        if w.ndim == 2:
            cut = np.quantile(np.abs(w), 0.9)
            w = np.where(np.abs(w) < cut, 0.0, w)
            nz = w != 0
            centroids = np.quantile(w[nz], np.linspace(0.05, 0.95, 8))
            w[nz] = centroids[np.abs(w[nz][:, None] - centroids[None]).argmin(axis=1)]
        weights.append(w.astype(np.float32))
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("mode", ["float32", "float16", "dynamic", "int8"])
@pytest.mark.parametrize("coder", ["range", "huffman"])
def test_roundtrip_is_byte_exact_and_predicts_the_same(sparse_clustered, digits, mode, coder):
    content = to_tflite(sparse_clustered, mode, digits.train.x[:50])
    blob = coding.encode(content, coder)
    decoded = coding.decode(blob)
    assert decoded == content
    a = TFLiteModel(content).predict(digits.test.x)
    b = TFLiteModel(decoded).predict(digits.test.x)
    assert np.array_equal(a, b)


def test_weights_are_found_for_every_layer(sparse_clustered):
    spans = coding.locate_weights(to_tflite(sparse_clustered, "float32"))
    assert sorted(s.length for s in spans) == sorted([64 * 128 * 4, 128 * 10 * 4])
    fp16 = coding.locate_weights(to_tflite(sparse_clustered, "float16"))
    assert {s.dtype for s in fp16} == {"float16"}  # followed through DEQUANTIZE


def test_pruned_and_clustered_codes_below_gzip(sparse_clustered):
    content = to_tflite(sparse_clustered, "float32")
    m = coding.measure(content)
    assert m["coded_bytes"] < gzip_size(content)
    assert m["coded_bytes"] < m["zlib_bytes"] and m["coded_bytes"] < m["zstd_bytes"]
    assert m["nonzero_weights"] == pytest.approx(0.1 * (64 * 128 + 128 * 10), rel=0.02)
    # 8 shared values (3 bits) plus the relative index of each non-zero weight
    assert m["bits_per_nonzero"] < 12


def test_negative_zero_survives_the_round_trip():
    """-0.0 and +0.0 differ in bits: a coder that merged them would not be exact."""
    from shrinkfleet.tfenv import keras

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs))
    w = np.zeros((8, 4), np.float32)
    w[::2, 1] = -0.0
    w[1, 2] = 0.5
    model.layers[1].set_weights([w, np.zeros(4, np.float32)])
    content = to_tflite(model, "float32")
    assert coding.decode(coding.encode(content)) == content


def test_corrupt_blobs_are_refused():
    with pytest.raises(coding.CodingError, match="bad magic"):
        coding.decode(b"nope" + bytes(20))
    with pytest.raises(coding.CodingError, match="corrupt header"):
        coding.decode(coding.MAGIC + (5).to_bytes(4, "little") + b"xxxxx")


def test_gap_coding_handles_long_runs():
    positions = np.array([0, 3, 600, 601, 5000])
    gaps = coding._gaps(positions)
    assert (gaps <= coding.GAP_ESCAPE).all()
    assert coding.gap_positions(gaps).tolist() == positions.tolist()
