"""Your own data: CSV and Parquet tables, folders of images. One test per accepted kind and per failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shrinkfleet.config import FeatureConfig, SplitConfig, parse_params
from shrinkfleet.datasets import DatasetError, apply_tabular, load_images, load_raw, load_table, prepare


def churn(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """A customer table: numbers, a string column and a string label that depends on both."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.integers(18, 80, n), "plan": rng.choice(["basic", "pro", "max"], n),
                       "spend": rng.normal(50, 10, n).round(2)})
    df["churned"] = np.where((df["plan"] == "basic") & (df["spend"] < 52), "yes", "no")
    return df


@pytest.mark.parametrize("source", ["csv", "parquet"])
def test_a_table_with_string_labels_and_columns(tmp_path, source):
    path = tmp_path / f"churn.{source}"
    df = churn()
    df.to_csv(path, index=False) if source == "csv" else df.to_parquet(path)
    raw = load_table(path, source, "churned")
    assert raw.class_names == ["no", "yes"]
    assert list(raw.x.columns) == ["age", "plan", "spend"]
    np.testing.assert_array_equal(raw.y, (df["churned"] == "yes").astype(int))
    prepared = prepare(raw, SplitConfig(), seed=0)
    enc = prepared.meta["normalization"]["encoding"]
    assert enc["categorical"] == {"plan": ["basic", "max", "pro"]}
    assert enc["feature_names"] == ["age", "plan=basic", "plan=max", "plan=pro", "spend"]
    assert prepared.input_shape == (5,) and prepared.meta["columns"] == ["age", "plan", "spend"]
    # standardised on the train split: mean 0 there, the one-hot columns included
    np.testing.assert_allclose(prepared.train.x.mean(axis=0), 0, atol=1e-5)


def test_only_the_listed_columns_are_features(tmp_path):
    churn().to_csv(tmp_path / "t.csv", index=False)
    raw = load_table(tmp_path / "t.csv", "csv", "churned", columns=["spend", "plan"])
    assert list(raw.x.columns) == ["spend", "plan"]


def test_categories_come_from_the_train_split_and_unseen_ones_encode_as_zeros(tmp_path):
    df = churn()
    raw = load_table(_csv(tmp_path, df), "csv", "churned")
    prepared = prepare(raw, SplitConfig(), seed=0)
    norm = prepared.meta["normalization"]
    unseen = df.drop(columns="churned").head(2).assign(plan="enterprise")
    basic = df.drop(columns="churned").head(2).assign(plan="basic")
    z_unseen, z_basic = apply_tabular(unseen, norm), apply_tabular(basic, norm)
    # plan=basic/max/pro are features 1-3: the unseen plan differs from "basic" only there
    np.testing.assert_allclose(z_unseen[:, [0, 4]], z_basic[:, [0, 4]])
    assert not np.allclose(z_unseen[:, 1], z_basic[:, 1])


def test_feature_selection_works_on_an_encoded_table(tmp_path):
    raw = load_table(_csv(tmp_path, churn()), "csv", "churned")
    prepared = prepare(raw, SplitConfig(), seed=0, features=FeatureConfig(select_k=2))
    assert prepared.input_shape == (2,)
    assert len(prepared.meta["normalization"]["select"]) == 2


def test_a_missing_value_names_the_column_and_the_rows(tmp_path):
    df = churn()
    df.loc[[3, 7], "spend"] = np.nan
    df.loc[5, "plan"] = None
    with pytest.raises(DatasetError, match=r"missing values in 'plan' \(1 of 240 rows\), 'spend' \(2 of 240 rows\); "
                                           "fill them, or set impute: median"):
        load_table(_csv(tmp_path, df), "csv", "churned")


def test_impute_median_fills_numbers_with_the_train_median(tmp_path):
    df = churn()
    df.loc[[3, 7], "spend"] = np.nan
    raw = load_table(_csv(tmp_path, df), "csv", "churned", impute="median")
    prepared = prepare(raw, SplitConfig(), seed=0, impute="median")
    assert np.isfinite(prepared.train.x).all() and np.isfinite(prepared.test.x).all()
    median = prepared.meta["normalization"]["encoding"]["impute"]["spend"]
    assert 40 < median < 60


@pytest.mark.parametrize(("change", "message"), [
    (lambda df: df, "no label column 'label'; the columns are: age, plan, spend, churned"),
    (lambda df: df.rename(columns={"churned": "label"}).assign(when=pd.Timestamp("2026-01-01")),
     "column 'when' holds datetime64"),
    (lambda df: df.rename(columns={"churned": "label"}).assign(spend=np.inf), "column 'spend' has 240 infinite"),
    (lambda df: df.rename(columns={"churned": "label"}).assign(label=None), "label column 'label' has 240 missing"),
])
def test_bad_tables_are_refused_naming_the_cause(tmp_path, change, message):
    path = tmp_path / "t.parquet"
    change(churn()).to_parquet(path)
    with pytest.raises(DatasetError, match=message):
        load_table(path, "parquet", "label")


def test_an_unreadable_table_names_the_file(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"t.parquet: cannot read as parquet"):
        load_table(tmp_path / "t.parquet", "parquet", "y")


def _csv(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def write_images(folder: Path, per_class: int = 6, size: tuple[int, int] = (20, 24), seed: int = 0) -> None:
    """Two classes of small images: bright on the left half, or on the right; PNG and JPEG mixed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(("left", "right")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(*size, 3), dtype=np.uint8)
            half = size[1] // 2
            img[:, label * half:(label + 1) * half] = 230
            Image.fromarray(img).save(folder / name / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.mark.parametrize(("color", "channels"), [("rgb", 3), ("grayscale", 1)])
def test_an_image_folder_is_decoded_and_resized(tmp_path, color, channels):
    write_images(tmp_path / "photos")
    raw = load_images(tmp_path / "photos", (16, 12), color)
    assert raw.x.shape == (12, 16, 12, channels) and raw.x.dtype == np.uint8
    assert raw.class_names == ["left", "right"] and raw.y.tolist() == [0] * 6 + [1] * 6
    left, right = raw.x[raw.y == 0].mean(axis=(0, 1, 3)), raw.x[raw.y == 1].mean(axis=(0, 1, 3))
    assert left[:6].mean() > right[:6].mean()  # the bright half survived the resize
    prepared = prepare(raw, SplitConfig(val_fraction=0.2, test_fraction=0.2), seed=0)
    assert prepared.meta["normalization"] == {"method": "scale", "scale": 255.0}


def test_an_unreadable_image_names_the_file(tmp_path):
    write_images(tmp_path / "photos")
    (tmp_path / "photos" / "left" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"left/broken.png: cannot decode the image"):
        load_images(tmp_path / "photos", (8, 8), "rgb")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda f: (f / "left" / "notes.txt").write_text("x"), r"notes.txt: not a PNG or JPEG file"),
    (lambda f: (f / "stray.png").write_bytes(b""), r"files beside the class folders \(stray.png\)"),
    (lambda f: (f / "empty").mkdir(), r"empty: class folder holds no image"),
])
def test_a_badly_laid_out_image_folder_is_refused(tmp_path, setup, message):
    write_images(tmp_path / "photos")
    setup(tmp_path / "photos")
    with pytest.raises(DatasetError, match=message):
        load_images(tmp_path / "photos", (8, 8), "rgb")


def test_one_class_folder_is_not_a_classification_dataset(tmp_path):
    write_images(tmp_path / "photos")
    import shutil

    shutil.rmtree(tmp_path / "photos" / "right")
    with pytest.raises(DatasetError, match="at least 2; found"):
        load_images(tmp_path / "photos", (8, 8), "rgb")


def test_params_accept_the_new_sources_and_load_raw_reads_them(tmp_path, tiny_params):
    churn().to_parquet(tmp_path / "churn.parquet")
    write_images(tmp_path / "photos")
    tiny_params["datasets"] = {
        "churn": {"source": "parquet", "path": "churn.parquet", "label": "churned", "impute": "median"},
        "photos": {"source": "images", "path": "photos", "image_size": [16, 16], "color": "grayscale"},
    }
    tiny_params["models"]["digits-mlp"]["dataset"] = "photos"
    tiny_params["models"]["cancer-mlp"]["dataset"] = "churn"
    fleet = parse_params(tiny_params)
    assert load_raw(fleet.datasets["photos"], tmp_path).x.shape == (12, 16, 16, 1)
    assert load_raw(fleet.datasets["churn"], tmp_path).class_names == ["no", "yes"]


@pytest.mark.parametrize(("spec", "message"), [
    ({"source": "images", "path": "p"}, "datasets.mine.image_size: required key is missing"),
    ({"source": "images", "path": "p", "image_size": [0, 8]}, "datasets.mine.image_size.0: must be greater"),
    ({"source": "images", "path": "p", "image_size": [8, 8], "features": {"select_k": 2}},
     "datasets.mine.features: feature selection/extraction applies to tabular data"),
    ({"source": "csv", "path": "t.csv"}, "datasets.mine.label: required key is missing"),
    ({"source": "csv", "path": "t.csv", "label": "y", "impute": "mean"}, "datasets.mine.impute: must be one of"),
])
def test_bad_dataset_settings_name_their_key(tiny_params, spec, message):
    from shrinkfleet.config import ConfigError

    tiny_params["datasets"]["mine"] = spec
    with pytest.raises(ConfigError, match=message):
        parse_params(tiny_params)


def houses(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Prices: a linear rule of area and rooms, a step per city, and noise."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"area": rng.uniform(30, 200, n).round(1), "rooms": rng.integers(1, 6, n),
                       "city": rng.choice(["north", "south", "east"], n)})
    df["price"] = (1000 * df["area"] + 5000 * df["rooms"] + df["city"].map({"north": 0, "south": 2e4, "east": 5e4})
                   + rng.normal(0, 5000, n))
    return df


def test_a_regression_table_keeps_its_numbers_and_standardises_the_target(tmp_path):
    path = tmp_path / "houses.csv"
    houses().to_csv(path, index=False)
    raw = load_table(path, "csv", "price", task="regression")
    assert raw.task == "regression" and raw.y.dtype == np.float64 and raw.class_names == []
    prepared = prepare(raw, SplitConfig(), seed=0, features=FeatureConfig(select_k=3))
    target = prepared.meta["target"]
    assert prepared.meta["task"] == "regression" and prepared.num_classes == 1
    assert 100_000 < target["mean"] < 250_000
    np.testing.assert_allclose(prepared.train.y.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(prepared.train.y.std(), 1, atol=1e-4)
    # mutual information with a number: area, the city's strongest one-hot column, ... kept
    names = np.array(prepared.meta["normalization"]["encoding"]["feature_names"])
    assert "area" in names[prepared.meta["normalization"]["select"]]


def test_a_regression_label_must_be_numbers(tmp_path):
    df = houses().assign(price="expensive")
    with pytest.raises(DatasetError, match="a regression label must be numbers"):
        load_table(_csv(tmp_path, df), "csv", "price", task="regression")


def test_an_npz_regression_dataset(tmp_path):
    from shrinkfleet.datasets import load_npz

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    np.savez(tmp_path / "r.npz", x=x, y=x @ [1.0, -2.0, 0.5, 0.0] + 3.0)
    raw = load_npz(tmp_path / "r.npz", "tabular", "regression")
    prepared = prepare(raw, SplitConfig(), seed=0)
    assert prepared.task == "regression" and prepared.train.y.dtype == np.float32
    assert len(prepared.train) + len(prepared.val) + len(prepared.test) == 120
