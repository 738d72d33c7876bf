"""Tonight's data over last night's file: DVC sees it, exactly the models that read it re-run, and say why."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_project, shrinkfleet_cmd
from tests.team.test_nightly_deployment import quick_params

pytestmark = pytest.mark.slow

ALL = "prepare, teacher, distill, prune, compress, evaluate"


def _write_npz(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    np.savez(path, x=x, y=(x[:, 0] + x[:, 1] > 0).astype(np.int64))


def _write_idx(path: Path, magic: int, arr: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes())


def _write_scans(folder: Path, n: int, seed: int) -> None:
    """An MNIST-format folder: 28x28 images whose class is the row where a bright bar sits."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 4 + 2 * label, :] = 255
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", 2051, images)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", 2049, labels)


def _dvc_status(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out or "{}")


def _closing_lines(stdout: str) -> dict[str, str]:
    """``{model: what its closing line says ran}`` from a run's output (``✓ m: ran a, b (why); production ...``)."""
    return {m: what for m, what in re.findall(r"✓ ([\w-]+): (.*?); production", stdout)}


def _reasons(project: Path) -> dict[str, str]:
    """``{model: shrinkfleet.reason}`` of the latest fleet run's model runs."""
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    (fleet,) = client.search_runs([exp.experiment_id], "tags.`shrinkfleet.kind` = 'fleet'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    runs = client.search_runs([exp.experiment_id], "tags.`shrinkfleet.kind` = 'model' and "
                              f"tags.`mlflow.parentRunId` = '{fleet.info.run_id}'")
    return {r.data.tags["shrinkfleet.model"]: r.data.tags["shrinkfleet.reason"] for r in runs}


def test_new_data_at_the_same_path_reruns_exactly_the_models_that_read_it(tmp_path):
    params = quick_params(("digits-mlp",))
    params["models"] = {}  # two models, each on a dataset of its own files
    params["recipes"] = {"pruned-int8": params["recipes"]["pruned-int8"]}  # what re-runs is per stage, not per recipe
    params["datasets"]["nightly"] = {"source": "npz", "path": "data/raw/nightly.npz", "kind": "tabular"}
    params["datasets"]["scans"] = {"source": "mnist", "path": "data/raw/scans"}
    params["datasets"]["spare"] = {"source": "sklearn", "name": "wine"}  # no model reads it
    for name, dataset in (("nightly-mlp", "nightly"), ("scans-mlp", "scans")):
        params["models"][name] = {"dataset": dataset, "teacher": {"arch": "mlp", "hidden": [16]},
                                  "student": {"arch": "mlp", "hidden": [8]}}
    project = make_project(tmp_path / "project", params)
    (project / "data" / "raw" / "scans").mkdir(parents=True)
    _write_npz(project / "data" / "raw" / "nightly.npz", 300, seed=1)
    _write_scans(project / "data" / "raw" / "scans", 200, seed=1)

    first = shrinkfleet_cmd("run", cwd=project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _closing_lines(first.stdout) == {m: f"ran {ALL} (first run)" for m in ("nightly-mlp", "scans-mlp")}
    assert _dvc_status(project) == {}  # the unused dataset included: it has no stage

    # Tonight's rows, written over last night's file.
    _write_npz(project / "data" / "raw" / "nightly.npz", 400, seed=2)
    assert _dvc_status(project) == {"prepare-nightly": [{"changed deps": {"data/raw/nightly.npz": "modified"}}]}
    second = shrinkfleet_cmd("run", cwd=project)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _closing_lines(second.stdout) == {"nightly-mlp": f"ran {ALL} (data/raw/nightly.npz changed)",
                                             "scans-mlp": "up to date, nothing ran"}
    assert _reasons(project) == {"nightly-mlp": "data/raw/nightly.npz changed", "scans-mlp": ""}
    meta = json.loads((project / "data" / "prepared" / "nightly" / "meta.json").read_text())
    assert sum(meta["samples"].values()) == 400
    assert _dvc_status(project) == {}

    # A folder source: one file of it replaced.
    _write_scans(project / "data" / "raw" / "scans", 250, seed=3)
    third = shrinkfleet_cmd("run", cwd=project)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _closing_lines(third.stdout) == {"nightly-mlp": "up to date, nothing ran",
                                            "scans-mlp": f"ran {ALL} (data/raw/scans changed)"}
    assert _dvc_status(project) == {}

    # Forcing one stage whose inputs did not change rewrites the same bytes: the stages after it stay up to date.
    pruned = project / "models" / "nightly-mlp" / "pruned.keras"
    before = pruned.read_bytes()
    forced = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "prune-nightly-mlp"], cwd=project,
                            capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert pruned.read_bytes() == before
    assert _dvc_status(project) == {}
