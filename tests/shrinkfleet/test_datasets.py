"""Every loader on its real format, and a clear error for each kind of broken file."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shrinkfleet.config import MnistDataset, NpzDataset, SplitConfig
from shrinkfleet.datasets import (
    DatasetError,
    RawData,
    check_raw,
    digest,
    load_cifar10,
    load_mnist,
    load_npz,
    load_prepared,
    load_raw,
    load_sklearn,
    prepare,
    save_prepared,
)


def _cifar_batch(n: int, rng: np.random.Generator, label: bytes) -> dict:
    return {
        b"batch_label": label,
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def make_cifar_tarball(path: Path, per_batch: int = 20, poison: bool = False) -> Path:
    """A tiny tarball in the real CIFAR-10 "python version" layout (pickled dicts, bytes keys)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: object) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(1, 6):
            batch = _cifar_batch(per_batch, rng, f"training batch {i} of 5".encode())
            add(f"data_batch_{i}", _Evil() if poison and i == 1 else batch)
        add("test_batch", _cifar_batch(per_batch, rng, b"testing batch 1 of 1"))
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        add("batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_sklearn_digits_are_images_and_cancer_is_tabular():
    digits = load_sklearn("digits")
    assert digits.kind == "image" and digits.x.shape == (1797, 8, 8, 1) and digits.scale == 16.0
    cancer = load_sklearn("breast_cancer")
    assert cancer.kind == "tabular" and cancer.x.shape == (569, 30)


def test_real_mnist_t10k(mnist_dir):
    raw = load_mnist(mnist_dir)
    assert raw.x.shape == (10000, 28, 28, 1) and raw.x.dtype == np.uint8
    assert raw.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(raw.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert raw.x_test is None  # t10k alone is the pool shrinkfleet splits


def test_mnist_train_and_test_pairs(tmp_path):
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 2051, np.zeros((n, 28, 28), np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n, dtype=np.uint8) % 10)
    raw = load_mnist(tmp_path)
    assert raw.x.shape == (30, 28, 28, 1) and raw.x_test.shape == (10, 28, 28, 1)


def _write_idx(path: Path, magic: int, arr: np.ndarray, truncate: int = 0) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate])


def test_mnist_wrong_magic(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, np.zeros((3, 28, 28), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="wrong IDX magic number 2049, expected 2051"):
        load_mnist(tmp_path)


def test_mnist_truncated_payload(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, np.zeros((3, 28, 28), np.uint8), truncate=100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="truncated or padded"):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip(tmp_path, mnist_dir):
    data = (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz: cannot read IDX file"):
        load_mnist(tmp_path)


def test_mnist_labels_outside_its_ten_classes(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, np.zeros((4, 28, 28), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 1, 2, 12], np.uint8))
    with pytest.raises(DatasetError, match="label 12 is outside the source's 10 classes 0..9"):
        load_raw(MnistDataset(path=str(tmp_path)), tmp_path)


def test_mnist_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(b"\x00" * 4000)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[:20] + b"\xff" * 40 + good[60:])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz: cannot read IDX file: truncated or corrupt"):
        load_mnist(tmp_path)


def test_mnist_missing_folder_and_labels(tmp_path):
    with pytest.raises(DatasetError, match="MNIST folder not found"):
        load_mnist(tmp_path / "nope")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="t10k images and labels must both be present"):
        load_mnist(tmp_path)


def test_cifar10_tarball_in_real_format(tmp_path):
    raw = load_cifar10(make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz"))
    assert raw.x.shape == (100, 32, 32, 3) and raw.x_test.shape == (20, 32, 32, 3)
    assert raw.class_names[:2] == ["airplane", "automobile"] and raw.scale == 255.0
    # channel-last transpose of the row-major 3x1024 layout: pixel (0,0) of image 0 is data[0, [0, 1024, 2048]]
    rng = np.random.default_rng(0)
    first = _cifar_batch(20, rng, b"")[b"data"][0]
    assert raw.x[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]


def test_cifar10_pickle_cannot_run_code(tmp_path):
    path = make_cifar_tarball(tmp_path / "evil.tar.gz", poison=True)
    with pytest.raises(DatasetError, match="refusing to load posix.system|refusing to load os.system"):
        load_cifar10(path)


def test_cifar10_not_a_tarball(tmp_path):
    bad = tmp_path / "cifar.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    with pytest.raises(DatasetError, match="cannot read the tarball"):
        load_cifar10(bad)


@pytest.mark.parametrize("layout", ["split", "xy"])
def test_npz_both_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 5)).astype(np.float32), np.arange(60) % 3
    arrays = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]} if layout == "split" \
        else {"x": x, "y": y}
    np.savez(tmp_path / "d.npz", **arrays)
    raw = load_npz(tmp_path / "d.npz", "tabular")
    assert len(raw.y) == (40 if layout == "split" else 60)
    assert (raw.x_test is not None) == (layout == "split")


def test_npz_without_the_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="needs arrays x_train/y_train .* it has \\['features'\\]"):
        load_npz(tmp_path / "d.npz", "tabular")


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="cannot read as .npz"):
        load_npz(tmp_path / "d.npz", "tabular")


def test_npz_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="cannot read as .npz"):
        load_npz(tmp_path / "d.npz", "tabular")


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), "1 feature values are NaN or infinite"),
        (np.ones((2, 2)), np.array([0, -1]), "labels must be class ids >= 0, found -1"),
        (np.ones((2, 2)), np.array([0.5, 1.0]), "labels must be integer class ids"),
        (np.ones((3, 2)), np.array([0, 1]), "3 samples but 2 labels"),
        (np.ones((2, 2)), np.array([1, 1]), "needs at least 2 classes"),
        (np.ones(4), np.array([0, 1, 0, 1]), "features must be at least 2-D"),
    ],
)
def test_bad_arrays_are_refused(x, y, message):
    with pytest.raises(DatasetError, match=message):
        check_raw(RawData(x=x, y=y, kind="tabular"), where="mine.npz")


def test_test_labels_outside_training_classes():
    raw = RawData(x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]), kind="tabular",
                  x_test=np.ones((2, 2)), y_test=np.array([0, 5]))
    with pytest.raises(DatasetError, match="test label 5 is outside the training classes 0..1"):
        check_raw(raw, where="mine.npz")


def test_load_raw_resolves_paths_against_the_params_folder(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 2)), y=np.arange(10) % 2)
    raw = load_raw(NpzDataset(path="d.npz"), tmp_path)
    assert raw.x.shape == (10, 2)


def test_prepare_splits_normalises_on_train_only_and_is_seeded():
    raw = load_sklearn("breast_cancer")
    a = prepare(raw, SplitConfig(val_fraction=0.15, test_fraction=0.2), seed=3)
    b = prepare(raw, SplitConfig(val_fraction=0.15, test_fraction=0.2), seed=3)
    c = prepare(raw, SplitConfig(val_fraction=0.15, test_fraction=0.2), seed=4)
    assert a.meta["digest"] == b.meta["digest"] != c.meta["digest"]
    assert len(a.train) + len(a.val) + len(a.test) == 569
    assert abs(len(a.test) - 0.2 * 569) <= 1
    np.testing.assert_allclose(a.train.x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(a.train.x.std(axis=0), 1, atol=1e-4)
    assert np.abs(a.test.x.mean(axis=0)).max() > 1e-3  # test used the train statistics, not its own
    # stratified: class shares of train and test agree within 3 points
    assert abs(a.train.y.mean() - a.test.y.mean()) < 0.03


def test_prepare_limits_and_images_scale_to_unit_range():
    p = prepare(load_sklearn("digits"), SplitConfig(), seed=0, limit=300, limit_test=100)
    assert len(p.train) == 300 and len(p.test) == 100
    assert p.train.x.min() >= 0 and p.train.x.max() <= 1 and p.train.x.max() > 0.9
    assert p.meta["input_shape"] == [8, 8, 1] and p.meta["num_classes"] == 10


def test_save_and_load_roundtrip_is_byte_stable(tmp_path):
    p = prepare(load_sklearn("wine"), SplitConfig(), seed=0)
    save_prepared(p, tmp_path / "wine")
    first = {f.name: f.read_bytes() for f in (tmp_path / "wine").iterdir()}
    save_prepared(p, tmp_path / "wine")  # overwrite in place
    second = {f.name: f.read_bytes() for f in (tmp_path / "wine").iterdir()}
    assert first == second  # same content, same bytes: DVC sees no change
    q = load_prepared(tmp_path / "wine")
    assert digest(q) == p.meta["digest"] == q.meta["digest"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp folders left behind


def test_load_prepared_names_the_missing_stage(tmp_path):
    with pytest.raises(DatasetError, match="run the prepare stage first"):
        load_prepared(tmp_path / "nothing")


def test_feature_selection_keeps_exactly_k_fitted_on_train_only():
    from shrinkfleet.config import FeatureConfig
    from shrinkfleet.datasets import apply_tabular

    raw = load_sklearn("breast_cancer")
    p = prepare(raw, SplitConfig(), seed=0, features=FeatureConfig(select_k=5))
    assert p.train.x.shape[1] == p.val.x.shape[1] == p.test.x.shape[1] == 5
    assert p.meta["input_shape"] == [5] and p.meta["raw_input_shape"] == [30]
    norm = p.meta["normalization"]
    # fitted on train only: the train split is exactly standardised, the test split is not
    np.testing.assert_allclose(p.train.x.mean(axis=0), 0, atol=1e-5)
    assert np.abs(p.test.x.mean(axis=0)).max() > 1e-3
    # re-applying the stored transform to raw rows reproduces the prepared features
    idx = np.flatnonzero(np.isin(raw.y, [0, 1]))[:3]
    again = apply_tabular(raw.x[idx], norm)
    assert again.shape == (3, 5)
    # selection depends on the train split's labels: shuffled labels pick (almost surely) other columns
    rng = np.random.default_rng(0)
    shuffled = prepare(RawData(x=raw.x, y=rng.permutation(raw.y), kind="tabular"), SplitConfig(), seed=0,
                       features=FeatureConfig(select_k=5))
    assert shuffled.meta["normalization"]["select"] != norm["select"]


def test_variance_threshold_and_pca():
    from shrinkfleet.config import FeatureConfig

    raw = load_sklearn("wine")
    raw.x[:, 3] = 1.0  # a constant column
    p = prepare(raw, SplitConfig(), seed=0, features=FeatureConfig(variance_threshold=0.0, pca=4))
    assert 3 not in p.meta["normalization"]["columns"]
    assert p.train.x.shape[1] == 4
    ratios = p.meta["normalization"]["pca"]["explained_variance_ratio"]
    assert ratios == sorted(ratios, reverse=True) and sum(ratios) < 1


def test_feature_settings_that_keep_nothing_are_errors():
    from shrinkfleet.config import FeatureConfig

    with pytest.raises(DatasetError, match="variance_threshold 1000000000.0 drops all 30 features"):
        prepare(load_sklearn("breast_cancer"), SplitConfig(), seed=0, features=FeatureConfig(variance_threshold=1e9))
    with pytest.raises(DatasetError, match="select_k 40 is more than the 30 features left"):
        prepare(load_sklearn("breast_cancer"), SplitConfig(), seed=0, features=FeatureConfig(select_k=40))
