"""Two runs on one workspace: the second refuses (``--if-busy refuse``) or waits; alias moves stay atomic."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from shrinkfleet import faults, locks, registry
from tests.conftest import make_project, shrinkfleet_cmd
from tests.reliability.conftest import (
    RELIABLE,
    cli_env,
    fleet_runs,
    model_runs,
    one_model,
    stages_ran,
    start_run,
    wait_for,
)

MODEL = "cancer-mlp"


def _holder_pid(project: Path) -> int | None:
    return locks.holder(project).get("pid")


@pytest.mark.slow
def test_a_second_run_refuses_or_waits_and_the_first_finishes(tmp_path):
    project = make_project(tmp_path / "p", one_model(RELIABLE, MODEL))
    # the first run holds the workspace for a while (its teacher waits 20 s before training)
    first = start_run(project, env=cli_env(**{faults.ENV: f"teacher@{MODEL}=delay:20"}))
    wait_for(lambda: _holder_pid(project) == first.pid, 120, "the first run to take the lock", first)

    refused = shrinkfleet_cmd("run", "--if-busy", "refuse", cwd=project)
    assert refused.returncode == 3
    assert "busy" in refused.stderr and f"pid {first.pid}" in refused.stderr

    second = start_run(project)  # default: wait
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0, out1 + err1
    assert second.returncode == 0, out2 + err2
    assert f"pid {first.pid}" in err2 and "waiting" in err2
    runs = fleet_runs(project)
    assert len(runs) == 2  # the refused run started nothing
    newest, oldest = runs
    assert newest.info.start_time >= oldest.info.end_time  # one after the other, never interleaved
    assert stages_ran(model_runs(project, oldest.info.run_id)[MODEL]) == {
        "prepare", "teacher", "distill", "prune", "compress", "evaluate"}
    assert stages_ran(model_runs(project, newest.info.run_id)[MODEL]) == set()  # it found everything done
    assert json.loads((project / "metrics" / f"{MODEL}.json").read_text())["model"] == MODEL


def test_if_busy_takes_wait_or_refuse_only(tmp_path):
    project = make_project(tmp_path / "p", one_model(RELIABLE, MODEL))
    result = shrinkfleet_cmd("run", "--if-busy", "later", cwd=project)
    assert result.returncode == 2 and "--if-busy" in result.stderr and "wait, refuse" in result.stderr
    assert not (project / "mlflow.db").exists()


def _mover(uri: str, model: str, worker: int, moves: int) -> None:
    """Promote and roll back over and over, as concurrent gate runs and operators would."""
    mlflow.set_tracking_uri(uri)
    for i in range(moves):
        try:
            if (i + worker) % 2:
                registry.rollback(model, None, f"worker {worker} move {i}")
            else:
                registry.promote(model, str(1 + (i + worker) % 3), f"worker {worker} move {i}", force=True,
                                 gate_check=lambda mv: [])
        except registry.RegistryError:
            pass  # already in production / nothing earlier: a refused move records nothing


def test_concurrent_alias_moves_form_one_unbroken_history(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    client.create_registered_model(MODEL)
    with mlflow.start_run(experiment_id=client.create_experiment("artifacts")) as run:
        mlflow.log_text("x", "model/file.txt")
    for _ in range(3):
        client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    registry.move_alias(MODEL, "1", "promote", "first", "test")

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_mover, args=(uri, MODEL, w, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0

    mlflow.set_tracking_uri(uri)
    history = registry.events(MODEL)
    assert len(history) > 5  # the workers did move it, many times
    for before, after in itertools.pairwise(history):
        assert after["from_version"] == before["to_version"], (before, after)
    assert str(client.get_model_version_by_alias(MODEL, "production").version) == history[-1]["to_version"]
