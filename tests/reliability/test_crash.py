"""A run killed (SIGKILL) in the middle of a stage: the next run recovers and resumes.

The fault hook stops ``compress`` with its output complete in a temporary folder that was
not yet renamed into place; the test then kills the run's whole process group, as the OOM
killer or a lost node would.
"""

from __future__ import annotations

import zipfile

import pytest

from shrinkfleet import faults
from tests.conftest import make_project, shrinkfleet_cmd
from tests.reliability.conftest import (
    RELIABLE,
    cli_env,
    dvc_status,
    fleet_runs,
    kill_group,
    model_runs,
    one_model,
    stages_ran,
    start_run,
    wait_for,
)

pytestmark = pytest.mark.slow

MODEL = "cancer-mlp"


def test_sigkill_mid_stage_then_the_next_run_resumes(tmp_path):
    project = make_project(tmp_path / "p", one_model(RELIABLE, MODEL))
    marker = project / ".shrinkfleet" / "faults" / f"compress@{MODEL}.hang"
    proc = start_run(project, env=cli_env(**{faults.ENV: f"compress@{MODEL}=hang"}))
    try:
        wait_for(marker.exists, 600, "compress to reach its rename", proc)
    finally:
        kill_group(proc)
    assert proc.returncode == -9

    # what the kill left: the parent MLflow run still RUNNING, compress's output only in a temporary folder
    killed = fleet_runs(project)[0]
    assert killed.info.status == "RUNNING"
    model_dir = project / "models" / MODEL
    leftovers = [p.name for p in model_dir.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
    assert leftovers and all(p.startswith(".variants.") for p in leftovers)
    assert not (model_dir / "variants").exists()
    # every artifact in place is whole: the finished stages' Keras files are valid archives
    for name in ("teacher", "student", "pruned"):
        with zipfile.ZipFile(model_dir / f"{name}.keras") as z:
            assert z.testzip() is None
    # DVC sees the finished stages as up to date and only the killed one (and what follows) as not
    status = dvc_status(project)
    assert f"compress-{MODEL}" in status
    assert set(status) <= {f"compress-{MODEL}", f"evaluate-{MODEL}"}

    rerun = shrinkfleet_cmd("run", cwd=project)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    out = rerun.stdout + rerun.stderr
    assert "recovered: removed" in out and ".variants." in out
    assert f"MLflow run {killed.info.run_id} was left RUNNING" in out
    # the killed run is closed as KILLED; the new one recomputed only the killed stage and what follows
    assert fleet_runs(project)[1].info.run_id == killed.info.run_id
    assert fleet_runs(project)[1].info.status == "KILLED"
    latest = fleet_runs(project)[0]
    assert latest.info.status == "FINISHED"
    assert stages_ran(model_runs(project, latest.info.run_id)[MODEL]) == {"compress", "evaluate"}
    assert not [p for p in project.rglob(".*.tmp*")]
    assert {p.name for p in (model_dir / "variants").iterdir()} >= {"manifest.json", "pruned-clustered.tflite",
                                                                    "pruned-int8.tflite"}
    assert dvc_status(project) == {}
