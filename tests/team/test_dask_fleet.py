"""The fleet fanned out over a Dask cluster: two worker processes (one thread each) on loopback.

The same fleet on the process pool gives the same bytes: every dataset, model, flatbuffer and
coded blob. (Keras drew its initial weights' seeds from Python's global ``random``, which a
Dask worker's event-loop thread draws from too, so Dask runs trained from different weights.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import make_project, shrinkfleet_cmd
from tests.team.test_nightly_deployment import quick_params

pytestmark = pytest.mark.slow

MODELS = ("digits-mlp", "cancer-mlp")
STAGES = ("teacher", "distill", "prune", "compress", "evaluate")


def _artifacts(project: Path) -> dict[str, str]:
    """``{path: sha256}`` of everything the stages wrote (metrics hold latencies: not compared).

    DVC's own ``.gitignore`` files are left out: DVC appends an entry as each stage is
    recorded, so their order follows which stage finished first.
    """
    files = [p for folder in ("data/prepared", "models") for p in (project / folder).rglob("*")
             if p.is_file() and p.name != ".gitignore"]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_models_run_on_two_dask_workers_and_match_the_process_pool(tmp_path):
    from distributed import LocalCluster

    project = make_project(tmp_path / "project", quick_params(MODELS))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        workers = set(cluster.scheduler_info["workers"])
        assert len(workers) == 2
        result = shrinkfleet_cmd("run", "--models", ",".join(MODELS), "--dask-address", cluster.scheduler_address,
                                 cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Dask at {cluster.scheduler_address}" in result.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("shrinkfleet/tiny")
    (fleet,) = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'fleet'")
    assert fleet.data.tags["shrinkfleet.engine"] == "dask"
    assert fleet.data.tags["shrinkfleet.dask_address"] == cluster.scheduler_address
    assert fleet.data.metrics["models_ok"] == 2
    model_runs = client.search_runs([exp.experiment_id], filter_string="tags.`shrinkfleet.kind` = 'model'")
    placed = {r.data.tags["shrinkfleet.model"]: {s: r.data.tags[f"shrinkfleet.worker.{s}"] for s in STAGES}
              for r in model_runs}
    assert set(placed) == set(MODELS)
    # Every stage ran on one of the cluster's workers, both workers did work, and the two
    # models trained their teachers at the same time, so on different workers.
    assert {w for stages in placed.values() for w in stages.values()} == workers, placed
    assert placed["digits-mlp"]["teacher"] != placed["cancer-mlp"]["teacher"], placed

    # The same inputs on the process pool give the same bytes.
    again = make_project(tmp_path / "again", quick_params(MODELS))
    local = shrinkfleet_cmd("run", "--models", ",".join(MODELS), "--engine", "process", cwd=again, timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    on_dask, on_pool = _artifacts(project), _artifacts(again)
    assert len(on_dask) > 20 and {p for p in on_dask if p.endswith(".sfc")}
    assert on_pool == on_dask
