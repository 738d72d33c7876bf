"""The shipped params.yaml, as `make run` runs it: what its digits-cnn serves (issue: within 2 points)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_project, shrinkfleet_cmd

pytestmark = pytest.mark.slow


def test_the_shipped_digits_cnn_serves_a_small_variant_within_two_points_of_its_teacher(tmp_path: Path):
    """The default fleet's settings (epochs and all), digits-cnn alone; production is read back from `status`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {"digits-cnn": params["models"]["digits-cnn"]}
    params["datasets"] = {"digits": params["datasets"]["digits"]}
    project = make_project(tmp_path / "project", params)

    run = shrinkfleet_cmd("run", cwd=project)
    assert run.returncode == 0, run.stdout + run.stderr
    status = shrinkfleet_cmd("status", "--json", cwd=project)
    assert status.returncode == 0, status.stdout + status.stderr
    (entry,) = json.loads(status.stdout)
    served = entry["production"]
    doc = json.loads((project / "metrics" / "digits-cnn.json").read_text())
    teacher, variant = doc["variants"]["teacher"], doc["variants"][served["variant"]]
    assert variant["format"] == "tflite"
    assert teacher["accuracy"] - variant["accuracy"] <= 0.02, (served, teacher["accuracy"])
    assert served["metrics"]["accuracy_drop"] == pytest.approx(teacher["accuracy"] - variant["accuracy"])
    assert variant["coded_bytes"] * 10 < teacher["coded_bytes"]
