"""Your own data end to end: a Parquet table and a folder of images, run as a fleet, then served from the registry."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from shrinkfleet.datasets import load_images
from tests.conftest import make_project, shrinkfleet_cmd
from tests.shrinkfleet.test_sources import churn, write_images
from tests.team.test_nightly_deployment import quick_params

pytestmark = pytest.mark.slow


def test_a_table_and_an_image_folder_run_as_a_fleet_and_serve_raw_inputs(tmp_path):
    params = quick_params(("digits-mlp",))
    params["teacher"]["epochs"] = params["distill"]["epochs"] = 12
    for stage in ("teacher", "distill", "prune"):  # 54 training images: small steps, or pruning has none to recover
        params[stage]["batch_size"] = 16
    params["prune"]["epochs"] = 4
    params["gate"] = {"max_accuracy_drop": 1.0}  # the point here is serving, not how good tiny models get
    params["datasets"] = {
        "churn": {"source": "parquet", "path": "data/raw/churn.parquet", "label": "churned"},
        "photos": {"source": "images", "path": "data/raw/photos", "image_size": [12, 12], "color": "rgb"},
    }
    params["models"] = {
        "churn-mlp": {"dataset": "churn", "teacher": {"arch": "mlp", "hidden": [32]},
                      "student": {"arch": "mlp", "hidden": [8]}},
        "photos-cnn": {"dataset": "photos", "teacher": {"arch": "cnn", "filters": [8], "dense": [16]},
                       "student": {"arch": "cnn", "filters": [4], "dense": [8]}},
    }
    project = make_project(tmp_path / "project", params)
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    table = churn(400)
    table.to_parquet(raw / "churn.parquet")
    write_images(raw / "photos", per_class=40, size=(12, 12))

    result = shrinkfleet_cmd("run", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ churn-mlp: ran" in result.stdout and "✓ photos-cnn: ran" in result.stdout

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    # The table's model takes its raw columns by name, strings as strings.
    served = mlflow.pyfunc.load_model("models:/churn-mlp@production")
    assert [c.name for c in served.metadata.get_input_schema().inputs] == ["age", "plan", "spend"]
    rows = table.drop(columns="churned")
    probs = np.asarray(served.predict(rows))
    assert probs.shape == (400, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    accuracy = np.mean(probs.argmax(axis=1) == (table["churned"] == "yes").to_numpy())
    assert accuracy > 0.75, accuracy  # the label is a rule of plan and spend: far above chance (about 0.6)
    with pytest.warns(UserWarning, match="'plan': enterprise not seen in training"):
        served.predict(rows.head(3).assign(plan="enterprise"))

    # The image model takes uint8 images as they are decoded, height x width x channels.
    photos = mlflow.pyfunc.load_model("models:/photos-cnn@production")
    images = load_images(raw / "photos", (12, 12), "rgb")
    out = np.asarray(photos.predict(images.x))
    assert out.shape == (80, 2)
    assert np.mean(out.argmax(axis=1) == images.y) > 0.8  # bright left half or right half
    assert tuple(photos.metadata.get_input_schema().inputs[0].shape) == (-1, 12, 12, 3)


def test_a_regression_table_runs_gates_on_error_and_serves_prices_in_their_units(tmp_path):
    from tests.shrinkfleet.test_sources import houses

    params = quick_params(("digits-mlp",))
    params["teacher"]["epochs"] = params["distill"]["epochs"] = 30
    params["prune"].update(epochs=4, target_sparsity=0.3)
    params["gate"] = {"max_error_increase": 10.0}  # the route, not how good tiny models get
    params["datasets"] = {"houses": {"source": "csv", "path": "data/raw/houses.csv", "label": "price",
                                     "task": "regression"}}
    params["models"] = {"houses-mlp": {"dataset": "houses", "teacher": {"arch": "mlp", "hidden": [32]},
                                       "student": {"arch": "mlp", "hidden": [16]}}}
    project = make_project(tmp_path / "project", params)
    (project / "data" / "raw").mkdir(parents=True)
    table = houses(600)
    table.to_csv(project / "data" / "raw" / "houses.csv", index=False)

    result = shrinkfleet_cmd("run", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " MAE " in result.stdout and "accuracy %" not in result.stdout  # (MAE +% is behind --wide)

    import json

    doc = json.loads((project / "metrics" / "houses-mlp.json").read_text())
    teacher = doc["variants"]["teacher"]
    assert doc["task"] == "regression" and {"mae", "rmse", "r2", "error_increase"} <= set(teacher)
    assert "accuracy" not in teacher
    assert teacher["r2"] > 0.8 and teacher["mae"] < 15_000  # prices span about 200,000; noise 5,000
    for v in doc["variants"].values():
        assert v["error_increase"] == pytest.approx((v["mae"] - teacher["mae"]) / teacher["mae"])

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    served = mlflow.pyfunc.load_model("models:/houses-mlp@production")
    prices = np.asarray(served.predict(table.drop(columns="price")))
    assert prices.shape == (600,)
    version = mlflow.MlflowClient().get_model_version_by_alias("houses-mlp", "production")
    served_mae = float(version.tags["shrinkfleet.metric.mae"])
    assert np.mean(np.abs(prices - table["price"].to_numpy())) == pytest.approx(served_mae, rel=0.35)
    assert 100_000 < prices.mean() < 250_000  # in the label's units, not standardised
